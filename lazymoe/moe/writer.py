"""Stream a plan to safetensors shards: headers first (the plan knows every offset), then bytes.

Straight copies (same dtype, no noise, no residual scale) go file-to-file through the kernel; anything
transformed is read as one tensor, transformed in float32, cast and written, then released. Peak memory
is therefore one tensor (three with a dtype change), whatever the model or shard size.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import ModelFileError
from ..io.safetensors import (build_header, copy_bytes, float32_bytes, read_tensor, tensor_bytes_view, torch_dtype,
                              write_all)
from ..io.sources import TensorInfo, WeightStore
from ..lazy import torch
from .plan import MergePlan, OutTensor, Piece
from .transforms import expert_weight, leaves_unchanged


class _Transforms:
    def __init__(self, plan: MergePlan, gates, store: WeightStore):
        self.plan = plan
        self._gates = gates
        self.store = store

    @property
    def gates(self):
        """The router rows, a float32 numpy array (L, rows, H) (``compute_gates``)."""
        return self._gates() if callable(self._gates) else self._gates

    def source(self, piece: Piece) -> TensorInfo:
        return self.store.resolve(piece.model, piece.source.name)

    def is_copy(self, out: OutTensor, piece: Piece) -> bool:
        if piece.source is None or piece.source.dtype != out.dtype:
            return False
        return piece.expert is None or leaves_unchanged(self.plan.config, piece.expert, is_residual=piece.is_residual)

    def materialise(self, out: OutTensor, piece: Piece) -> memoryview:
        """The bytes of a tensor that is not a straight copy: router rows (cast with numpy, so a merge whose rows
        need no torch never imports it), zeros, or a source tensor transformed in float32 and cast."""
        if out.computed in ("gate", "shared_gate"):
            E = self.plan.config.num_experts  # the shared gate's row comes after the experts' (MergePlan.gate_rows)
            rows = slice(E, None) if out.computed == "shared_gate" else slice(None, E)
            return float32_bytes(self.gates[out.gate_layer, rows], out.dtype)
        dtype = torch_dtype(out.dtype)
        if out.computed == "zeros":
            return tensor_bytes_view(torch.zeros(out.shape, dtype=dtype))
        t = read_tensor(self.source(piece))
        if piece.expert is None:
            return tensor_bytes_view(t.to(dtype))
        return tensor_bytes_view(expert_weight(self.plan.config, piece.expert, piece.source.name, t,
                                               is_residual=piece.is_residual, dtype=dtype))


def write_shards(plan: MergePlan, gates, folder: Path, store: WeightStore, *,
                 progress: bool = True, on_shard=None, check=None, skip: frozenset[str] = frozenset()) -> None:
    """Write every shard of ``plan`` (and the index when there are several) into ``folder``.

    ``gates`` is the router rows (``router.gates.compute_gates``), or a function that waits for them: it is
    called only when the last shard (the routers') is written, so a router pass may still run until then.
    ``store`` makes source weights local on first use (``WeightStore``, or ``io.fetch.RangedWeights``) and
    hears when each output tensor is done (``done(index)``) and when a model's last tensor is (``release``).
    ``on_shard(path)`` is called with each shard once it is complete (an upload starts there); ``check()``
    before each tensor (it raises to stop the writer: the router pass failed). Shards named in ``skip`` are
    not written (a resumed push: the Hub holds them); the index still lists them.
    """
    tx = _Transforms(plan, gates, store)
    last_use = {}
    for ref, index in plan.last_use().items():
        last_use.setdefault(index, []).append(ref)
    index = 0
    bar = tqdm(total=plan.output_bytes, unit="B", unit_scale=True, unit_divisor=1024,
               desc="Writing shards", disable=not progress)
    try:
        for shard in plan.shards:
            if shard.filename in skip:
                for _ in shard.tensors:
                    store.done(index)
                    for ref in last_use.get(index, ()):
                        store.release(ref)
                    index += 1
                bar.total -= shard.nbytes
                continue
            header = build_header([(t.name, t.dtype, t.shape, t.nbytes) for t in shard.tensors])
            path = folder / shard.filename
            with open(path, "wb", buffering=0) as f:
                write_all(f, header)
                for t in shard.tensors:
                    if check is not None:
                        check()
                    start = f.tell()
                    for piece in t.pieces:
                        if tx.is_copy(t, piece):
                            copy_bytes(tx.source(piece), f)
                        else:
                            data = tx.materialise(t, piece)
                            write_all(f, data)
                            del data
                    written = f.tell() - start
                    if written != t.nbytes:  # a source whose header lied about its size
                        raise ModelFileError(
                            f"{t.name}: wrote {written} bytes where the plan expected {t.nbytes}; a source file "
                            "changed since it was planned. Download the model again, then run the merge again.")
                    bar.update(t.nbytes)
                    store.done(index)
                    for ref in last_use.get(index, ()):
                        store.release(ref)
                    index += 1
            bar.set_postfix_str(shard.filename, refresh=False)
            if on_shard is not None:
                on_shard(path)
    finally:
        bar.close()
    if len(plan.shards) > 1:
        index = {
            "metadata": {"total_size": plan.output_bytes, "total_parameters": plan.total_params},
            "weight_map": {t.name: s.filename for s in plan.shards for t in s.tensors},
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
