"""The routing picture: the layer-wise forward against transformers, the counts, the warnings, the PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import moe_config
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import lazymoe
from lazymoe.router import block, plot, routing
from lazymoe.errors import ConfigError
from lazymoe.router.prompts import right_padded

TEXTS = ["def add(a, b):\n    return a + b", "Once upon a time, a dragon slept.", "Solve 2x + 3 = 11", "Hi"]


@pytest.fixture(scope="module", params=["classic", "fused"])
def moe(request, tiny_world, tmp_path_factory):
    experts = [tiny_world["chat"], tiny_world["code"], tiny_world["math"]]
    cfg = moe_config(tiny_world["base"], experts, gate_mode="classifier", experts_per_token=2)
    out = tmp_path_factory.mktemp("routing") / f"moe-{request.param}"
    return lazymoe.merge(cfg, out, layout=request.param, progress=False)


def transformers_router_logits(folder, seqs):
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    seen = {}
    for i, layer in enumerate(model.model.layers):
        layer.mlp.gate.register_forward_hook(lambda _m, _a, out, i=i: seen.__setitem__(i, out[0]))
    ids, mask = right_padded(seqs, pad_id=seqs[0][0])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    return [seen[i].reshape(*ids.shape, -1) for i in range(len(seen))], mask.bool()


def test_layerwise_forward_matches_transformers_mixtral(moe):
    tok = AutoTokenizer.from_pretrained(str(moe))
    seqs = [tok(t)["input_ids"] for t in TEXTS]
    ours = routing.stream_router_logits(moe, seqs)
    theirs, mask = transformers_router_logits(moe, seqs)
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        assert torch.allclose(a[mask], b[mask], atol=1e-5), (a[mask] - b[mask]).abs().max()


def test_report_counts_every_token_after_bos_with_transformers_choices(moe):
    tok = AutoTokenizer.from_pretrained(str(moe))
    report = routing.routing_report(moe, extra_texts=[TEXTS[1]])
    prompts = moe_config("b", ["x", "y", "z"])["experts"]
    assert report.groups[:3] == report.experts and report.groups[3].startswith("text 1: Once upon")
    assert report.expected == [0, 1, 2, None]
    for g, group in enumerate([p["positive_prompts"] for p in prompts] + [[TEXTS[1]]]):
        seqs = [tok(t)["input_ids"] for t in group]
        assert report.tokens[g] == sum(len(s) - 1 for s in seqs)  # the leading BOS is not counted
        logits, mask = transformers_router_logits(moe, seqs)
        mask[:, 0] = False
        for layer, z in enumerate(logits):
            top = z[mask].topk(2, dim=-1).indices
            want_top1 = np.bincount(top[:, 0].numpy(), minlength=3) / len(top)
            want_chosen = np.bincount(top.flatten().numpy(), minlength=3) / len(top)
            assert np.allclose(report.top1[g, layer], want_top1)
            assert np.allclose(report.chosen[g, layer], want_chosen)
    assert np.allclose(report.top1.sum(-1), 1.0) and np.allclose(report.chosen.sum(-1), 2.0)
    acc = report.accuracy()
    want = sum(report.top1[g, :, g].mean() * report.tokens[g] for g in range(3)) / sum(report.tokens[:3])
    assert acc == pytest.approx(want)
    assert "prompt tokens routed first to their own expert" in report.summary()


def test_report_takes_prompts_by_expert_name_or_index(moe):
    names = routing.routing_report(moe).experts
    by_name = routing.routing_report(moe, {names[1]: ["def f(x):"]})
    by_index = routing.routing_report(moe, {1: ["def f(x):"]})
    assert by_name.groups == by_index.groups == [names[1]] and np.array_equal(by_name.chosen, by_index.chosen)
    with pytest.raises(ConfigError, match="prompts_by_expert has key"):
        routing.routing_report(moe, {"nobody": ["x"]})
    with pytest.raises(ConfigError, match="3 experts"):
        routing.routing_report(moe, [["x"]])


def test_parallel_gate_rows_warn_of_a_singular_gate_and_a_collapse(moe, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(moe, broken)
    for shard in broken.glob("*.safetensors"):
        tensors = load_file(shard)
        for name, t in tensors.items():
            if name.endswith("gate.weight"):
                gen = torch.Generator().manual_seed(0)
                tensors[name] = t[0].expand_as(t).clone() + 1e-4 * torch.randn(t.shape, generator=gen)
        save_file(tensors, shard, metadata={"format": "pt"})
    report = routing.routing_report(broken)
    assert all(c > block.SINGULAR_CONDITION for c in report.gate_condition)
    text = "\n".join(report.warnings)
    assert "nearly singular in layer(s) 0-1" in text
    assert report.accuracy() < 0.5  # the experts' own prompts are routed about at random


def test_warning_rules_on_hand_made_counts(tmp_path):
    L, E = 4, 4
    top1 = np.full((2, L, E), 0.25)
    top1[0, 1:3] = [0.94, 0.02, 0.02, 0.02]  # layers 1-2: expert 0 takes 94% of the first group
    top1[1, 1:3] = [0.94, 0.02, 0.02, 0.02]
    chosen = np.minimum(2 * top1, 1.0)
    chosen[:, :, 3] = 0.0  # expert 3 never makes the top 2
    report = routing.RoutingReport(tmp_path, ["a", "b", "c", "d"], ["a", "b"], [0, 1], chosen, top1, [50, 50], 2,
                                   [1.2, 1.5, 40.0, 1.1])
    text = "\n".join(routing.routing_warnings(report))
    assert "expert 'a' is the first choice for 94% of tokens in layer(s) 1-2" in text
    assert "expert 'd' is never chosen" in text
    assert "the prompts of 'b' go to it first for only 14%" in text  # (0.25*2 + 0.02*2) / 4
    assert "nearly singular in layer(s) 2 (condition number up to 40)" in text
    assert "prompts of 'a'" not in text  # a's own prompts reach it 60% of the time: fine


def test_gate_condition_measures_angles_not_lengths_nor_shared_parts():
    assert block.gate_condition(torch.eye(3, 8) * torch.tensor([[1.0], [10.0], [100.0]])) == pytest.approx(1.0)
    centred = torch.eye(4, 8) - 0.25 * torch.ones(4, 8) * (torch.arange(8) < 4)  # rows sum to zero
    assert block.gate_condition(centred) < 1.5  # what a fitted router looks like: fine
    assert block.gate_condition(torch.tensor([[1.0, 0.0], [1.0, 0.01]])) > 100  # two rows nearly coincide
    shared = torch.eye(3, 8) * 0.05 + torch.ones(8)  # one direction dominates every row
    assert block.gate_condition(shared) > block.SINGULAR_CONDITION
    assert block.gate_condition(torch.ones(2, 4)) == float("inf")


def test_plot_is_a_png_and_leaves_no_pyplot_figures(moe, tmp_path):
    import matplotlib.image
    import matplotlib.pyplot as plt

    report = routing.routing_report(moe, extra_texts=["hello there"])
    path = plot.plot_routing(report, tmp_path / "sub" / "routing.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 400
    assert plt.get_fignums() == []  # nothing left open in a notebook's pyplot state
    assert not list(path.parent.glob("*.tmp"))


def test_the_picture_is_drawn_to_be_read_at_its_own_size(moe, tmp_path):
    import matplotlib.image

    report = routing.routing_report(moe)
    assert report.chosen.shape[0] >= 3  # several prompt groups: they wrap into rows instead of one wide row
    width = matplotlib.image.imread(plot.plot_routing(report, tmp_path / "routing.png")).shape[1]
    assert width <= 900, "wider than a notebook cell: it would be shrunk (or scrolled) until unreadable"
    assert plot.CELL_FONT_PT * plot.DPI / 72 >= 11, "each percentage at least 11 px high"


def test_a_dense_folder_is_refused_with_a_clear_message(tiny_world):
    with pytest.raises(ConfigError, match="not a MoE"):
        routing.routing_report(tiny_world["base"])


def test_a_folder_without_its_recipe_routes_given_text_and_says_how_in_each_front_end(moe, tmp_path, capsys):
    import shutil

    from lazymoe.cli import main
    from lazymoe.io.folder import CONFIG_FILENAME

    folder = tmp_path / "no-recipe"
    shutil.copytree(moe, folder)
    (folder / CONFIG_FILENAME).unlink()
    with pytest.raises(ConfigError, match=r"no prompts\. To see how text routes, pass prompts_by_expert or extra_texts\.$"):
        routing.routing_report(folder)
    assert main(["route", str(folder)]) == 2
    assert "no prompts. To see how text routes, add --text TEXT." in capsys.readouterr().err
    report = routing.routing_report(folder, extra_texts=["def f(x): return x"])
    assert report.groups[-1].startswith("text 1")
