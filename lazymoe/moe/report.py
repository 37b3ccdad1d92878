"""The plan as a table: the rows both the CLI and the notebook show."""

from __future__ import annotations

from ..units import human_bytes, human_duration, human_params
from .plan import MergePlan


def plan_rows(plan: MergePlan) -> list[tuple[str, str]]:
    """(label, value) rows, in the order a user reads them."""
    c = plan.config
    rows = [
        ("Input family", f"{plan.family} ({', '.join(sorted({m.model_type for m in plan.models.values()}))} models)"),
        ("Output architecture", f"{plan.output.name} ({plan.output.architecture}, {plan.layout} layout): "
                                f"{plan.output_reason}"),
        ("Base model", c.base_model),
        ("Layers", str(plan.num_layers)),
        ("Experts", f"{c.num_experts} ({c.experts_per_token} per token)"),
        ("Gate mode", c.gate_mode),
        ("dtype", plan.dtype),
        ("Total parameters", f"{human_params(plan.total_params)} ({plan.total_params:,})"),
        ("Active parameters", f"{human_params(plan.active_params)} ({plan.active_params:,})"),
        ("Output size", f"{human_bytes(plan.output_bytes)} in {len(plan.shards)} shard(s) of at most "
                        f"{human_bytes(plan.max_shard_bytes)}"),
        ("To download", human_bytes(plan.download_bytes)),
        ("Disk needed", human_bytes(plan.disk_bytes)),
        ("RAM needed (peak)", human_bytes(plan.peak_ram_bytes)),
    ]
    if plan.router_pass_bytes:
        when = ("while the shards are written" if plan.router_overlaps
                else "before the shards are written: it loads a whole model first")
        rows.append(("Router pass", f"{human_bytes(plan.router_pass_bytes)} of GPU memory (or RAM on CPU), {when}"))
    if plan.router_fit:
        fit = plan.router_fit
        rows.append(("Router fit time", f"about {human_duration(fit['gpu_seconds'])} with a GPU, "
                                        f"{human_duration(fit['cpu_seconds'])} on CPU only (estimate)"))
    return rows


def format_plan(plan: MergePlan) -> str:
    rows = plan_rows(plan)
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines.append("")
    lines.append("Experts:")
    for i, e in enumerate(plan.config.experts):
        prompts = "; ".join(e.positive_prompts) or "(no prompts)"
        lines.append(f"  [{i}] {e.source_model}: {prompts}")
    shared = plan.config.shared_expert
    if shared is not None:
        gate = "; ".join(shared.positive_prompts) or "(no prompts: constant gate 1/2)"
        lines.append(f"  [shared] {shared.source_model}: {gate}")
    if plan.warnings:
        lines.append("")
        lines.append("Warnings:")
        lines.extend(f"  - {w}" for w in plan.warnings)
    else:
        lines.append("")
        lines.append("No problems found with the models.")
    return "\n".join(lines)
