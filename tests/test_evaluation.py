"""`lazymoe eval`: losses from the logits against an independent cross-entropy, routing shares against
transformers' router logits, the 0/0 case, the retention maths on a trained world, eval.json, the card
section, the notebook steps and the CLI's one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import moe_config
from transformers import AutoModelForCausalLM, AutoTokenizer

import lazymoe
from lazymoe.evaluate import skill as evaluation
from lazymoe.io.texts import read_text_file
from lazymoe.cli import main
from lazymoe.errors import ConfigError
from lazymoe.publish.eval_report import EVAL_JSON, SCHEMA, EvalReport, ExpertEval, gain_kept

TEXTS = {
    0: ["Hello, how are you today? I am fine, thank you for asking.", "Tell me about your weekend plans please."],
    1: ["def add(a, b):\n    return a + b\n\nprint(add(2, 3))", "import os\nfor name in os.listdir('.'):\n    print(name)"],
    2: ["Solve 2x + 3 = 11, so 2x = 8 and x = 4.", "What is 12 * 7? It is 84, and 84 / 12 = 7."],
}


@pytest.fixture(scope="module")
def moe(tiny_world, tmp_path_factory):
    experts = [tiny_world["chat"], tiny_world["code"], tiny_world["math"]]
    cfg = moe_config(tiny_world["base"], experts, gate_mode="classifier", experts_per_token=2, seed=5,
                     router_continuation_tokens=0)
    return lazymoe.merge(cfg, tmp_path_factory.mktemp("eval") / "moe", progress=False)


def independent_losses(folder, seqs, starts):
    """Per sequence: F.cross_entropy of transformers' own logits, one sequence at a time (no padding)."""
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for seq, start in zip(seqs, starts):
            logits = model(input_ids=torch.tensor([seq])).logits[0]
            logp = logits.log_softmax(-1)
            out.append(-logp[torch.arange(start, len(seq) - 1), torch.tensor(seq[start + 1:])])
    return out


def test_loss_from_the_logits_equals_an_independent_cross_entropy(moe, tiny_world):
    tok = AutoTokenizer.from_pretrained(str(moe))
    seqs = [tok(t)["input_ids"] for t in TEXTS[1] + TEXTS[2]]
    starts = [1, 3, 1, 2]
    for folder in (moe, tiny_world["base"], tiny_world["code"]):
        ours = evaluation.score(folder, seqs, starts).losses
        theirs = independent_losses(folder, seqs, starts)
        for a, b, seq, start in zip(ours, theirs, seqs, starts):
            assert a.shape == (len(seq) - 1 - start,)
            assert torch.allclose(a, b, atol=2e-5), (folder, (a - b).abs().max())


def test_the_metric_is_not_mixtrals_out_loss(moe):
    """out.loss with output_router_logits adds router_aux_loss_coef x aux; ours is the LM loss alone."""
    tok = AutoTokenizer.from_pretrained(str(moe))
    seq = tok(TEXTS[0][0])["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(str(moe), dtype=torch.float32).eval()
    ids = torch.tensor([seq])
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids, output_router_logits=True)
    ours = float(evaluation.score(moe, [seq], [0]).losses[0].mean())
    assert out.aux_loss is not None and float(out.aux_loss) > 0
    assert math.isclose(float(out.loss), ours + model.config.router_aux_loss_coef * float(out.aux_loss), abs_tol=1e-5)
    assert not math.isclose(float(out.loss), ours, abs_tol=1e-4)


def test_routing_shares_match_transformers_router_logits(moe):
    report = evaluation.evaluate(moe, texts=TEXTS, progress=False)
    tok = AutoTokenizer.from_pretrained(str(moe))
    model = AutoModelForCausalLM.from_pretrained(str(moe), dtype=torch.float32).eval()
    for e, texts in TEXTS.items():
        row = report.experts[e]
        picks: list[list[torch.Tensor]] = [[] for _ in range(2)]
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"]])
            with torch.no_grad():
                routers = model(input_ids=ids, output_router_logits=True).router_logits
            for layer, z in enumerate(routers):
                picks[layer].append(z.reshape(ids.shape[1], -1)[1:-1].topk(2, dim=-1).indices)  # scored positions
        for layer, chosen in enumerate(torch.cat(p) for p in picks):
            assert row.tokens == chosen.shape[0]
            assert row.top1_by_layer[layer] == pytest.approx(float((chosen[:, 0] == e).float().mean()), abs=1e-9)
            assert row.topk_by_layer[layer] == pytest.approx(float((chosen == e).any(-1).float().mean()), abs=1e-9)
            assert sum(row.top1_matrix[layer]) == pytest.approx(1.0)
        assert row.texts_kind == "config" and row.texts == 2


def test_identical_experts_give_equal_losses_and_no_gain_to_keep(tiny_world, tmp_path):
    cfg = moe_config(tiny_world["base"], [tiny_world["base"], tiny_world["base"]], allow_all_same_experts=True,
                     gate_mode="random", seed=1)
    folder = lazymoe.merge(cfg, tmp_path / "same", progress=False)
    report = evaluation.evaluate(folder, texts={0: TEXTS[0], 1: TEXTS[1]}, progress=False)
    for row in report.experts:
        assert row.loss_base == row.loss_expert, "the expert is the base: one pass, the same numbers"
        assert row.loss_moe == pytest.approx(row.loss_base, abs=1e-5)
        assert row.gain_kept is None and "no gain to keep" in row.kept_note
    assert report.rows()[0]["kept"] == "—"
    assert gain_kept(2.0, 2.0, 2.0) == (None, gain_kept(2.0, 2.0, 2.0)[1])
    assert gain_kept(2.0, 1.5, 1.75)[0] == pytest.approx(0.5)
    assert gain_kept(2.0, 1.5, 2.25)[0] == pytest.approx(-0.5), "a MoE worse than the base keeps a negative share"
    assert "worse than the base" in gain_kept(2.0, 2.5, 2.0)[1]


def test_retention_maths_on_a_trained_world(trained_world, tmp_path):
    """Base, expert and MoE losses differ on a trained world; each equals lm_loss of the full model."""
    from worlds import heldout_batch, lm_loss  # the loss over real tokens after BOS, as the evaluation counts it

    world = trained_world
    folder = lazymoe.merge(world.recipe("mlp", "words", gate_mode="classifier", seed=3), tmp_path / "world-moe",
                           progress=False)
    seq_len = world.spec.seq_len
    domains = world.spec.domains
    report = evaluation.evaluate(folder, texts={i: world.heldout[d] for i, d in enumerate(domains)},
                                 max_tokens=seq_len, max_texts=100, progress=False)
    tok = AutoTokenizer.from_pretrained(str(world.tokenizer))
    load = lambda p: AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).eval()  # noqa: E731
    base, moe_model = load(world.base), load(folder)
    for i, d in enumerate(domains):
        batch = heldout_batch(tok, world.heldout[d], seq_len)
        expected = (lm_loss(base, *batch), lm_loss(load(world.experts["mlp"][d]), *batch), lm_loss(moe_model, *batch))
        row = report.experts[i]
        assert (row.loss_base, row.loss_expert, row.loss_moe) == pytest.approx(expected, abs=2e-5)
        assert row.loss_base - row.loss_expert > 0.05, "the trained expert really gains on its domain"
        assert row.gain_kept == pytest.approx((expected[0] - expected[2]) / (expected[0] - expected[1]), abs=1e-3)
        assert row.tokens == int(batch[1][:, 2:].sum())


def test_eval_json_png_and_card_section(moe):
    report = evaluation.write_evaluation(moe, texts=TEXTS, progress=False)
    data = json.loads((moe / EVAL_JSON).read_text())
    assert data["schema"] == SCHEMA and data["num_experts"] == 3 and data["experts_per_token"] == 2
    assert data["loss_unit"] == "nats per token" and data["gain_kept"] == "(base - moe) / (base - expert)"
    assert [r["index"] for r in data["experts"]] == [0, 1, 2]
    for row in data["experts"]:
        assert set(row) >= {"name", "source_model", "texts_kind", "texts_label", "tokens", "loss_base", "loss_expert",
                            "loss_moe", "gain_kept", "gain_kept_note", "top1", "topk", "top1_by_layer",
                            "topk_by_layer", "top1_matrix", "notes"}
        assert len(row["top1_by_layer"]) == data["num_layers"] == 2
        assert row["gain_kept"] == gain_kept(row["loss_base"], row["loss_expert"], row["loss_moe"])[0]
    assert EvalReport.read(moe).to_json() == data, "eval.json round-trips"
    assert (moe / "eval.png").read_bytes().startswith(b"\x89PNG")
    card = (moe / "README.md").read_text()
    assert "## Evaluation" in card and "![Loss and routing per expert](eval.png)" in card
    for row in report.rows():
        assert f"| {row['expert']} | config | {row['tokens']} | {row['base']} | {row['expert_loss']} | {row['moe']} |" in card


def test_card_section_renders_every_field_and_dashes(moe):
    from lazymoe.publish import card

    report = EvalReport("m", 3, 2, 3, [
        ExpertEval(0, "code", "org/code", "file", "code.txt", 4, 100, 2.0, 1.5, 1.75, [1.0, 0.5, 0.0], [1.0, 1.0, 0.0]),
        ExpertEval(1, "math", "org/math", "none", ""),
        ExpertEval(2, "chat", "org/chat", "generated", "seed 3", 2, 10, 2.0, 2.0, 2.0, [0.0] * 3, [0.5] * 3),
    ], skipped=["expert 1 (math): no eval_texts and no positive prompts to write from: not measured"])
    rows = report.card_data()["rows"]
    assert rows[0] == ["0: code", "file", "100", "2.000", "1.500", "1.750", "50%", "50% / 67%"]
    assert rows[1] == ["1: math", "none", "0", "—", "—", "—", "—", "—"]
    assert rows[2][6] == "—"
    text = card.render_card(card.card_data(card.ModelFacts.from_folder(moe), evaluation=report, eval_image="eval.png"))
    evaluation_section = text[text.index("## Evaluation"):text.index("## Usage")]
    assert "| 0: code | file | 100 | 2.000 | 1.500 | 1.750 | 50% | 50% / 67% |" in evaluation_section
    assert "- Not measured: expert 1 (math): no eval\\_texts" in evaluation_section
    assert "2: chat: gain kept not defined: the expert does no better than the base" in evaluation_section
    assert "'generated': written by the expert itself" in evaluation_section
    assert "skipped: expert 1 (math)" in report.summary()
    bare = card.render_card(card.card_data(card.ModelFacts.from_folder(moe)))
    assert "## Evaluation" not in bare and "## Questions" not in bare


def test_hub_dataset_without_datasets_falls_back_to_the_experts_own_text(moe, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    report = evaluation.evaluate(moe, texts={0: {"dataset": "org/chat-texts", "limit": 4}}, generate_tokens=8,
                                 progress=False)
    row = report.experts[0]
    assert row.texts_kind == "generated" and row.texts == 2  # moe_config gives expert 0 two positive prompts
    assert any("'datasets' package is not installed" in n and "used text the expert wrote" in n for n in row.notes)
    assert row.loss_moe is not None and row.loss_expert is not None
    # only the expert's own words are scored: at most 8 per prompt, never the prompt's tokens
    assert 2 <= row.tokens <= 16


def test_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("first text\nstill first\n\n\nsecond text\n")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n"two"\n')
    (tmp_path / "c.json").write_text('["x", "y"]')
    assert read_text_file(tmp_path / "a.txt") == ["first text\nstill first", "second text"]
    assert read_text_file(tmp_path / "b.jsonl") == ["one", "two"]
    assert read_text_file(tmp_path / "c.json") == ["x", "y"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl, line 2: not JSON"):
        read_text_file(tmp_path / "bad.jsonl")
    with pytest.raises(ConfigError, match="does not exist"):
        read_text_file(tmp_path / "missing.txt")


def test_eval_texts_in_the_config_are_validated_and_kept_out_of_plain_recipes():
    from lazymoe.config import load_config

    cfg = moe_config("a", ["b", "c"])
    assert "eval_texts" not in load_config(cfg).to_yaml() and "eval_questions" not in load_config(cfg).to_yaml()
    cfg["experts"][0]["eval_texts"] = {"dataset": "openai/gsm8k", "name": "main", "column": "question"}
    cfg["experts"][1]["eval_texts"] = "texts/code.txt"
    cfg["eval_questions"] = ["What can you do?"]
    loaded = load_config(cfg)
    assert loaded.experts[0].eval_texts.limit == 32 and loaded.experts[1].eval_texts == "texts/code.txt"
    assert load_config(loaded.to_yaml()) == loaded
    cfg["experts"][1]["eval_texts"] = []
    with pytest.raises(ConfigError, match=r"experts\[1\]\.eval_texts.*empty list"):
        load_config(cfg)


# ------------------------------------------------------------------------------------------ questions


def test_questions_side_by_side_with_the_routed_experts(moe, tmp_path):
    from lazymoe.evaluate.questions import answer_questions, read_questions, write_answers

    path = tmp_path / "q.txt"
    path.write_text("# comment\n[code] def add(a, b):\nTell me a story.\n[2] What is 17 * 23?\n")
    questions = read_questions(path)
    assert [(q.text, q.expert) for q in questions] == [("def add(a, b):", "code"), ("Tell me a story.", None),
                                                         ("What is 17 * 23?", 2)]
    result = answer_questions(moe, questions, compare="moe,base,experts", max_new_tokens=5)
    assert result["models"] == ["MoE", "base", "0: chat", "1: code", "2: math"]
    assert [q["expert"] for q in result["questions"]] == [1, None, 2]
    for q in result["questions"]:
        routed = q["answers"]["MoE"]["routed"]
        assert len(routed) == 3 and sum(routed) == pytest.approx(1.0)
        assert all("routed" not in a for name, a in q["answers"].items() if name != "MoE")
    md, js = write_answers(moe, result, in_card=True)
    assert "### Q1 (for code): def add(a, b):" in md.read_text()
    assert json.loads(js.read_text())["in_card"] is True
    lazymoe.publish.card.rerender_card(moe)
    assert "## Questions, side by side" in (moe / "README.md").read_text()
    # greedy with the chat template: the base answers exactly as transformers' own greedy generate does
    tok = AutoTokenizer.from_pretrained(str(moe))
    base = AutoModelForCausalLM.from_pretrained(str(result_base_dir(moe)), dtype=torch.float32).eval()
    inputs = tok.apply_chat_template([{"role": "user", "content": "Tell me a story."}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    ids = base.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
    assert result["questions"][1]["answers"]["base"]["text"] == tok.decode(ids[0, inputs["input_ids"].shape[1]:],
                                                                            skip_special_tokens=True).strip()


def result_base_dir(moe):
    from lazymoe.config import load_config

    return load_config(moe / "lazymoe_config.yml").base_model


def test_a_moe_of_identical_experts_answers_like_its_base(tiny_world, tmp_path):
    from lazymoe.evaluate.questions import Question, answer_questions

    cfg = moe_config(tiny_world["base"], [tiny_world["same1"], tiny_world["same2"]], gate_mode="random", seed=2)
    folder = lazymoe.merge(cfg, tmp_path / "same", progress=False)
    result = answer_questions(folder, [Question("Once upon a time"), Question("def f(x):")], compare="moe,base",
                              max_new_tokens=8)
    for q in result["questions"]:
        assert q["answers"]["MoE"]["text"] == q["answers"]["base"]["text"]


def test_bad_question_tags_and_files_are_one_line_errors(moe, tmp_path):
    from lazymoe.evaluate.questions import Question, answer_questions, read_questions

    with pytest.raises(ConfigError, match="tagged 'poetry', which names no single expert"):
        answer_questions(moe, [Question("Write a poem", "poetry")])
    with pytest.raises(ConfigError, match="compare 'everyone'"):
        answer_questions(moe, [Question("Hi")], compare="moe,everyone")
    (tmp_path / "q.yaml").write_text("- question: Hi\n  expret: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'expret'"):
        read_questions(tmp_path / "q.yaml")


# ------------------------------------------------------------------------------------------ CLI


def test_cli_writes_the_table_and_files(moe, tmp_path, capsys):
    texts = tmp_path / "code.txt"
    texts.write_text("\n\n".join(TEXTS[1]))
    assert main(["-q", "eval", str(moe), "--texts", f"1={texts}", "--generate-tokens", "6", "--no-card"]) == 0
    out = capsys.readouterr().out
    assert "Skill retention of moe" in out and "Gain kept" in out and "1: code  file" in out
    data = json.loads((moe / EVAL_JSON).read_text())
    assert [r["texts_kind"] for r in data["experts"]] == ["generated", "file", "generated"]


@pytest.mark.parametrize("argv, message", [
    (["eval", "{missing}"], "has no config.json; give the folder lazymoe merge wrote."),
    (["eval", "{base}"], "has no config.json and lazymoe_config.yml"),
    (["eval", "{moe}", "--texts", "code.txt"], "--texts 'code.txt': write EXPERT=FILE"),
    (["eval", "{moe}", "--texts", "poetry={moe}/x.txt"], "eval texts given for 'poetry'"),
    (["eval", "{moe}", "--texts", "1={moe}/none.txt"], "none.txt does not exist"),
    (["eval", "{moe}", "--skip-retention"], "--skip-retention leaves nothing to do"),
    (["eval", "{moe}", "--questions", "{moe}/q.txt"], "Question file"),
    (["eval", "{moe}", "--max-tokens", "2"], "max_tokens at least 3"),
])
def test_cli_errors_are_one_line(moe, tiny_world, tmp_path, capsys, argv, message):
    argv = [a.format(missing=tmp_path / "nowhere", base=tiny_world["base"], moe=moe) for a in argv]
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


# ------------------------------------------------------------------------------------------ notebook steps


def test_notebook_steps_show_the_table_plot_and_answers(tiny_world, tmp_path):
    pytest.importorskip("ipywidgets")
    import yaml

    from lazymoe.notebook.ui import Builder
    from lazymoe.notebook.form import MoEForm

    config = moe_config(tiny_world["base"], [tiny_world[n] for n in ("chat", "code", "math")], seed=4)
    config["experts"][1]["eval_texts"] = TEXTS[1]
    config["experts"][2]["eval_questions"] = ["What is 12 * 7?"]
    config["eval_questions"] = ["Who are you?"]
    shown = []
    builder = Builder(MoEForm(yaml.safe_dump({**config, "notebook": {"model_name": "tiny-moe"}})), workdir=tmp_path,
                      show=shown.append)
    folder = builder.merge()
    builder.form.rows[0].extras["eval_texts"] = TEXTS[0]  # edited after the merge: the form's texts count
    shown.clear()
    report = builder.evaluate(generate_tokens=6)
    html = "\n".join(d for item in shown if isinstance(d := getattr(item, "data", None), str))
    assert [r.texts_kind for r in report.experts] == ["config", "config", "generated"]
    assert "lazymoe-eval" in html and "Gain kept" in html and "written by the expert itself" in html
    assert any(getattr(item, "data", b"").startswith(b"\x89PNG") for item in shown if isinstance(item.data, bytes))
    assert "## Evaluation" in (folder / "README.md").read_text()

    shown.clear()
    result = builder.ask("moe,base", max_new_tokens=4)
    assert [(q["question"], q["expert"]) for q in result["questions"]] == [("What is 12 * 7?", 2), ("Who are you?", None)]
    html = "\n".join(d for item in shown if isinstance(d := getattr(item, "data", None), str))
    assert "lazymoe-answers" in html and "routed:" in html and "answers.md" in html
    assert "## Questions, side by side" in (folder / "README.md").read_text()
    Builder._instances.clear()
