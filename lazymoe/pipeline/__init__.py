"""The steps a user runs, each one library call that both the CLI and the notebook make: ``merge.make_plan``
and ``merge.merge`` (config -> plan -> routers -> shards -> card), ``route.write_routing_picture``.
"""
