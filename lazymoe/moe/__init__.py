"""Dense checkpoints -> one MoE checkpoint (Mixtral, Qwen2-MoE or Qwen3-MoE): the name tables, the checks, the plan, the tensor transforms
and the shard writer. Everything here works from headers and tensors; no model is ever run.
"""
