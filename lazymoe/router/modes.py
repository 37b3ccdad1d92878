"""The gate modes: one table of names, groups and descriptions that the config, the plan, the form and the
card all read. Imports nothing, so any layer may use it.

To add a gate mode: add a row here, then teach ``router.gates.compute_gates`` to build it (its group decides
what the plan budgets for and whether prompts are required).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: random: no prompts; embedding: the base's input embeddings; hidden: the base's residual stream (streamed
#: in bfloat16); fitted: routers fitted on each layer's MLP input in the MoE being built (float32)
#: written: fitted on text the experts themselves write from their prompts (router/written.py)
Group = Literal["random", "embedding", "hidden", "fitted", "written"]


@dataclass(frozen=True)
class GateModeInfo:
    name: str
    group: Group
    label: str  # the notebook form's dropdown entry
    card_note: str  # how the routers were initialised, in a model card reader's words


GATE_MODE_TABLE: tuple[GateModeInfo, ...] = (
    GateModeInfo("hidden", "hidden", "hidden: the base model's hidden states (mergekit's default)",
                 "base model's hidden states at the last token of each expert's prompts"),
    GateModeInfo("hidden_last", "hidden", "hidden_last: same as hidden",
                 "base model's hidden states at the last token of each expert's prompts"),
    GateModeInfo("hidden_avg", "hidden", "hidden_avg: hidden states averaged over the prompt",
                 "base model's hidden states averaged over each expert's prompts"),
    GateModeInfo("cheap_embed", "embedding", "cheap_embed: token embeddings only (fast, no GPU)",
                 "mean token embeddings of each expert's prompts"),
    GateModeInfo("random", "random", "random: no prompts (you will train the router)",
                 "random (normal), prompts not used"),
    GateModeInfo("uniform_random", "random", "uniform_random: no prompts (you will train the router)",
                 "random (uniform), prompts not used"),
    GateModeInfo("centroid", "fitted", "centroid: fitted on each layer's real MLP input, calibrated (lazymoe)",
                 "each expert's mean MLP input on its prompts, per layer, with a calibrated logit scale"),
    GateModeInfo("classifier", "fitted", "classifier: a calibrated classifier per layer, on the base's text (lazymoe)",
                 "a calibrated classifier fitted per layer on the MLP inputs of the experts' prompts"),
    GateModeInfo("expert_classifier", "written",
                 "expert_classifier: the experts write text from your prompts; a classifier per layer learns it "
                 "(lazymoe; routes best)",
                 "a calibrated classifier fitted per layer on text each expert wrote from its own prompts"),
    GateModeInfo("trained", "written",
                 "trained: expert_classifier, then routers trained on the MoE's loss (lazymoe; slow at 7B)",
                 "routers trained on the MoE's own language-model loss over text each expert wrote, from a "
                 "classifier fitted on it"),
)

GATE_MODES: tuple[str, ...] = tuple(m.name for m in GATE_MODE_TABLE)
BY_NAME: dict[str, GateModeInfo] = {m.name: m for m in GATE_MODE_TABLE}


def modes_in(group: Group) -> tuple[str, ...]:
    return tuple(m.name for m in GATE_MODE_TABLE if m.group == group)


#: gate modes that read no prompt (the reference tool lets these go without prompts)
RANDOM_MODES = modes_in("random")
HIDDEN_MODES = modes_in("hidden")
FITTED_MODES = modes_in("fitted")
WRITTEN_MODES = modes_in("written")
#: what the notebook form starts with: the mode with the best suite minimum in bench/router_quality.py
#: (a recipe without gate_mode still gets mergekit-moe's default, hidden)
RECOMMENDED_GATE_MODE = "expert_classifier"
