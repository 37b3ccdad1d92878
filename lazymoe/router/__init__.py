"""Router initialisation and inspection: prompts, the layer-streamed base, the gate modes, the routing picture.

``modes`` is the table of gate modes (imports nothing); ``gates.compute_gates`` dispatches on it.
"""
