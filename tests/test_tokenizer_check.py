"""The base tokenizer check without transformers (``moe.checks.tokenizer_size``) gives transformers' verdict.

A merge whose gate mode reads no prompts checks the base tokenizer from its files with the `tokenizers`
library alone (transformers' import costs about 2 s of CPU, as long as copying a few GB on two cores). Each
case below edits a real tokenizer the way model repos do, and holds the fast check to what
``len(AutoTokenizer.from_pretrained(...))`` says, or to transformers refusing it too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

import lazymoe
from lazymoe.errors import ModelMismatchError
from lazymoe.moe.checks import LeftToTransformers, tokenizer_size
from tests.helpers import moe_config

ADDED = {"lstrip": False, "rstrip": False, "normalized": False, "single_word": False, "special": True}


def _config(**settings):
    def edit(folder):
        path = folder / "tokenizer_config.json"
        cfg = json.loads(path.read_text())
        cfg.update(settings)
        path.write_text(json.dumps(cfg))
    return edit


def _write(name, text):
    return lambda folder: (folder / name).write_text(text)


def _drop_decoder(folder):
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("added_tokens_decoder", None)
    path.write_text(json.dumps(cfg))


CASES = {
    "as built": lambda folder: None,
    "a new pad token": _config(pad_token="<pad>"),
    "a pad token the vocabulary has": _config(pad_token="</s>"),
    "a byte token as pad": _config(pad_token="<0x61>"),
    "one new token named three times": _config(pad_token="<z>", mask_token="<z>", additional_special_tokens=["<z>"]),
    "a setting of another name": _config(image_token="<image>"),
    "extra special tokens, a list": _config(extra_special_tokens=["<e1>", "<e2>"]),
    "extra special tokens, named": _config(extra_special_tokens={"image_token": "<img>", "bos": "<s>"}),
    "additional special tokens": _config(additional_special_tokens=["<a1>", "<s>"]),
    "added tokens decoder, a new token": _config(added_tokens_decoder={"600": {"content": "<x>", **ADDED}}),
    "added tokens decoder, an id in the vocabulary": _config(added_tokens_decoder={"5": {"content": "<y>", **ADDED}}),
    "special tokens map (not read by transformers 5)": _write("special_tokens_map.json",
                                                              json.dumps({"additional_special_tokens": ["<m>"]})),
    "a pad token as an object": _config(pad_token={"content": "<dp>", "special": True}),
    "a pad token as a saved AddedToken": _config(pad_token={"__type": "AddedToken", "content": "<ap>", **ADDED}),
    "a flag named like a token": _config(add_bos_token=True, add_eos_token=False),
    "a model's token setting that is not a string": _config(image_token=7),
    "additional special tokens, a string": _config(additional_special_tokens="<q>"),
    "tokenizer_config.json, a list": _write("tokenizer_config.json", "[1, 2]"),
    "tokenizer_config.json, damaged": _write("tokenizer_config.json", "{bad"),
    "tokenizer.json, damaged": _write("tokenizer.json", "{not json"),
    "tokenizer.json without a model": _write("tokenizer.json", json.dumps({"version": "1.0"})),
    # found by a hostile pass: what transformers refuses, ignores, or reads from older files
    "an empty pad token": _config(pad_token=""),
    "added tokens decoder, null": _config(added_tokens_decoder=None),
    "added tokens decoder, a key that is no id": _config(added_tokens_decoder={"abc": {"content": "<x>", **ADDED}}),
    "added tokens decoder, a bare string": _config(added_tokens_decoder={"0": "<unk>"}),
    "extra special tokens, plain objects": _config(extra_special_tokens=[{"content": "<e1>", "special": True}]),
    "older files, a new pad token in special_tokens_map.json": lambda folder: (
        _drop_decoder(folder), _write("special_tokens_map.json", json.dumps({"pad_token": "<pad>"}))(folder)),
    "older files, a new token in added_tokens.json": lambda folder: (
        _drop_decoder(folder), _write("added_tokens.json", json.dumps({"<new>": 512}))(folder)),
    "older files, special_tokens_map.json damaged": lambda folder: (
        _drop_decoder(folder), _write("special_tokens_map.json", "{bad")(folder)),
}
#: cases whose older token files transformers reads by its own rules: the file check leaves them to the full one
LEFT_TO_TRANSFORMERS = {name for name in CASES if name.startswith("older files")}


@pytest.fixture(scope="module")
def verdicts(tiny_world, tmp_path_factory):
    """Each case's tokenizer size by transformers (one subprocess: a clean import, as a user's) or its error."""
    root = tmp_path_factory.mktemp("tokenizers")
    folders = {}
    for i, (name, edit) in enumerate(CASES.items()):
        folder = root / f"case{i}"
        shutil.copytree(tiny_world["tokenizer"], folder)
        edit(folder)
        folders[name] = folder
    code = (
        "import json, sys\n"
        "from transformers import AutoTokenizer\n"
        "out = {}\n"
        "for name, folder in json.loads(sys.argv[1]).items():\n"
        "    try:\n"
        "        out[name] = len(AutoTokenizer.from_pretrained(folder))\n"
        "    except Exception as err:\n"
        "        out[name] = type(err).__name__\n"
        "print(json.dumps(out))\n"
    )
    run = subprocess.run([sys.executable, "-c", code, json.dumps({k: str(v) for k, v in folders.items()})],
                         capture_output=True, text=True, check=True)
    return folders, json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(CASES))
def test_the_fast_check_counts_what_transformers_loads(verdicts, case):
    folders, by_transformers = verdicts
    expected = by_transformers[case]
    if case in LEFT_TO_TRANSFORMERS:  # the full check decides: transformers' verdict by construction
        with pytest.raises(LeftToTransformers):
            tokenizer_size(folders[case])
    elif isinstance(expected, int):
        assert tokenizer_size(folders[case]) == expected
    else:  # transformers refuses it: so does the fast check
        with pytest.raises(Exception):
            tokenizer_size(folders[case])


def test_the_cases_cover_both_verdicts(verdicts):
    # the comparison above means something only if transformers both grows, keeps and refuses tokenizers here
    sizes = [v for v in verdicts[1].values() if isinstance(v, int)]
    assert min(sizes) == 512 and max(sizes) > 512
    assert any(isinstance(v, str) for v in verdicts[1].values())


@pytest.mark.parametrize("case", ["a new pad token", "older files, a new pad token in special_tokens_map.json",
                                  "older files, a new token in added_tokens.json"])
def test_a_merge_without_prompts_refuses_a_tokenizer_that_outgrows_the_embedding(tiny_world, tmp_path, case):
    # the demo tokenizer has 512 tokens and the tiny base embeds exactly 512: one new special token is one too many,
    # whether tokenizer_config.json names it or an older file that the full check reads does
    base = tmp_path / "base"
    shutil.copytree(tiny_world["base"], base)
    CASES[case](base)
    cfg = moe_config(base, [tiny_world["chat"], tiny_world["code"]], gate_mode="random")
    with pytest.raises(ModelMismatchError, match=r"the tokenizer has 513 tokens but the embedding only 512 rows"):
        lazymoe.make_plan(cfg, progress=False)
    with pytest.raises(ModelMismatchError, match=r"the tokenizer has 513 tokens"):
        lazymoe.merge(cfg, tmp_path / "moe", progress=False)  # the merge's own check, on its thread
    assert not (tmp_path / "moe").exists()


def test_a_merge_without_prompts_does_not_import_transformers(tiny_world, tmp_path):
    # the point of the fast check: a `random` merge from local folders never pays transformers' import; nor,
    # as it never talks to the Hub, huggingface_hub's client (lazymoe.lazy.hf_hub)
    cfg = moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]], gate_mode="random")
    path = tmp_path / "moe.yml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    out = tmp_path / "moe"
    code = ("import sys\n"
            "from lazymoe.cli import main\n"
            "assert main(['-q', 'merge', sys.argv[1], sys.argv[2]]) in (0, None)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'\n"
            "             or m in ('huggingface_hub.file_download', 'huggingface_hub.hf_api')))\n")
    run = subprocess.run([sys.executable, "-c", code, str(path), str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"
    assert (out / "tokenizer.json").read_bytes() == (tiny_world["base"] / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("settings,decided", [
    ({"gate_mode": "random"}, True),  # nothing to tokenise
    ({"gate_mode": "hidden"}, True),  # short prompts, far inside the context
    ({"gate_mode": "hidden", "router_chat_template": True}, False),  # only transformers renders a chat template
])
def test_the_files_decide_the_check_where_transformers_could_not_say_otherwise(tiny_world, settings, decided):
    from lazymoe.moe.checks import check_tokenizer_files

    plan = lazymoe.make_plan(moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]], **settings),
                             progress=False)
    assert check_tokenizer_files(plan.config, plan.base) is decided


def test_a_prompt_near_the_context_is_left_to_transformers_to_count(tiny_world, tmp_path):
    from lazymoe.moe.checks import check_tokenizer, check_tokenizer_files

    plan = lazymoe.make_plan(moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]],
                                        gate_mode="hidden"), progress=False)
    context = plan.base.config["max_position_embeddings"]
    fits = plan.config.model_copy(deep=True)
    fits.experts[0].positive_prompts = ["a " * (context - 4)]  # a token per "a ", within the context or nearly
    assert check_tokenizer_files(fits, plan.base) is False, "too close to the context for a margin-free count"
    assert check_tokenizer(fits, plan.base) is not None  # transformers counts it: it fits
    long = plan.config.model_copy(deep=True)
    long.experts[0].positive_prompts = ["a " * (context + 10)]
    assert check_tokenizer_files(long, plan.base) is False
    with pytest.raises(ModelMismatchError, match=r"experts\[0\]\.positive_prompts\[0\] is \d+ tokens long but the "
                                                 rf"base reads at most {context}"):
        check_tokenizer(long, plan.base)


def test_a_plan_whose_tokenizer_files_decide_the_check_does_not_import_transformers(tiny_world, tmp_path):
    # hidden tokenises its prompts when it merges, but the check itself is decided by the files: `lazymoe plan`
    # answers without transformers' import
    path = tmp_path / "moe.yml"
    path.write_text(json.dumps(moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]],
                                          gate_mode="hidden")))
    code = ("import sys, lazymoe\n"
            "lazymoe.make_plan(sys.argv[1], progress=False)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))\n")
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert run.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("edit,problem", [
    (_config(pad_token={"content": "<dp>", "special": True}),
     "TypeError: pad_token must be a token string, not {'content': '<dp>', 'special': True}"),
    (_write("tokenizer_config.json", "[1, 2]"), "TypeError: tokenizer_config.json holds a JSON list, not an object"),
    (_write("tokenizer.json", "{not json"), "Exception: key must be a string"),
])
def test_a_base_tokenizer_the_files_refuse_gets_one_line_naming_the_problem_and_the_fix(tiny_world, tmp_path, edit,
                                                                                      problem):
    base = tmp_path / "base"
    shutil.copytree(tiny_world["base"], base)
    edit(base)
    cfg = moe_config(base, [tiny_world["chat"], tiny_world["code"]], gate_mode="random")
    with pytest.raises(ModelMismatchError) as err:
        lazymoe.make_plan(cfg, progress=False)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"base_model ({base}): its tokenizer cannot be loaded ({problem}")
    assert message.endswith("The MoE reuses the base tokenizer, so the base folder's tokenizer files must load: "
                            "repair them, or use a base whose tokenizer loads.")


def test_a_tokenizer_that_fails_to_load_after_its_files_passed_is_still_one_line(tiny_world, tmp_path, monkeypatch):
    # the files decide the check for hidden, and the merge then loads the tokenizer to tokenise the prompts: should
    # transformers refuse it anyway (a rule the files cannot see), the merge stops with the check's one line
    from transformers import AutoTokenizer

    def refuse(*args, **kwargs):
        raise TypeError("Input must be a List[Union[str, AddedToken]]")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)
    cfg = moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]], gate_mode="hidden")
    with pytest.raises(ModelMismatchError, match=r"^base_model \(.*\): its tokenizer cannot be loaded \(TypeError: "
                                                 r"Input must be a List\[Union\[str, AddedToken\]\]\)\. The MoE reuses"):
        lazymoe.merge(cfg, tmp_path / "moe", progress=False)
    assert not (tmp_path / "moe").exists()
