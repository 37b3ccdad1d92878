"""Dense checkpoints -> one Mixtral checkpoint: the name tables, the checks, the plan, the tensor transforms
and the shard writer. Everything here works from headers and tensors; no model is ever run.
"""
