"""The sparse MoE block (Mixtral; Qwen MoE with its shared expert), written out, and how well a layer's
router tells experts apart.

Shared by the fitted gate modes (which run the MoE being built) and the routing picture (which runs a merged
folder); a test checks the router logits against transformers' own Mixtral.
"""

from __future__ import annotations

from ..lazy import np, torch
from ..moe.arch import SHARED_GATE_CONSTANT

SINGULAR_CONDITION = 5.0  # gate_condition above this: some experts are hard to tell apart (mergekit warns at 5 too)


def moe_mlp(x: torch.Tensor, logits: torch.Tensor, experts, k: int, act, *, normalise: bool = True) -> torch.Tensor:
    """The sparse block: softmax over all experts, keep the top k, renormalise them (Mixtral, Qwen3-MoE) or not
    (Qwen2-MoE as lazymoe writes it), mix their MLPs."""
    weights, chosen = logits.softmax(-1).topk(k, dim=-1)
    if normalise:
        weights = weights / weights.sum(-1, keepdim=True)
    flat, out = x.reshape(-1, x.shape[-1]), torch.zeros(x.numel() // x.shape[-1], x.shape[-1], device=x.device)
    share = weights.reshape(-1, k)
    picked = chosen.reshape(-1, k)
    for e, (gate_proj, up_proj, down_proj) in enumerate(experts):
        rows = (picked == e).any(-1).nonzero().squeeze(1)  # only the tokens that chose e run it
        if rows.numel():
            xe = flat[rows]
            w = (share[rows] * (picked[rows] == e)).sum(-1, keepdim=True)
            out.index_add_(0, rows, w * ((act(xe @ gate_proj.T) * (xe @ up_proj.T)) @ down_proj.T))
    return out.view_as(x)


def shared_mlp(x: torch.Tensor, gate: torch.Tensor, expert, act) -> torch.Tensor:
    """Qwen2-MoE's shared expert: its MLP times sigmoid(gate . x)."""
    gate_proj, up_proj, down_proj = expert
    return torch.sigmoid(x @ gate)[..., None] * ((act(x @ gate_proj.T) * (x @ up_proj.T)) @ down_proj.T)


def constant_shared_gate(num_layers: int, hidden: int) -> np.ndarray:
    """(L, 1, H) float32 numpy: the shared gate whose sigmoid is 1/2 for every token (to float rounding; see arch)."""
    return np.full((num_layers, 1, hidden), SHARED_GATE_CONSTANT, dtype=np.float32)


def gate_condition(gate) -> float:
    """How close a layer's router is to being unable to tell some experts apart (about 1 = fully distinct).

    A softmax router ignores whatever all rows share (adding a vector to every row adds the same number to
    every logit), so the rows are scaled to unit length and centred, and the result is 1 / the smallest of
    the E - 1 singular values that remain: 1 for orthonormal rows, 0.87 for four rows summing to zero,
    large when two rows nearly coincide or when one shared direction dominates every row (then the logits
    differ by little). mergekit-moe's warning takes the condition number of the raw rows instead, which
    flags every well-fitted router whose rows sum to zero.

    ``gate`` is (E, H), a numpy array or a torch tensor (numpy does the arithmetic: a random-mode merge never
    imports torch).
    """
    if hasattr(gate, "detach"):
        gate = gate.detach().cpu().double().numpy()
    rows = np.asarray(gate, dtype=np.float64)
    rows = rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)
    E = rows.shape[0]
    if E < 2:
        return 1.0
    smallest = float(np.linalg.svd(rows - rows.mean(0), compute_uv=False)[E - 2])
    return float("inf") if smallest <= 1e-12 else 1.0 / smallest
