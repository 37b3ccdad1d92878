"""Model cards: pinned output, Hub-parseable front matter, strict templates and usage code that really runs.

Golden files live in tests/golden/. After an intended change to the cards, regenerate them with

    LAZYMOE_UPDATE_GOLDEN=1 python -m pytest tests/test_card.py

and review the diff before committing it.
"""

from __future__ import annotations

import ast
import difflib
import json
import os
import re
import shutil
import sys
import types
from pathlib import Path

import jinja2
import pytest
import yaml

from lazymoe.cli import build_parser
from lazymoe.config import load_config
from lazymoe.errors import ModelNotFoundError
from lazymoe.io.safetensors import TensorInfo
from lazymoe.io.sources import ModelInfo, ModelRef
from lazymoe.moe.plan import build_plan
from lazymoe.publish import card, gguf_card, render

GOLDEN = Path(__file__).parent / "golden"
REPO_ROOT = Path(__file__).resolve().parents[1]

MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 32000, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "hidden_act": "silu", "rms_norm_eps": 1e-5, "sliding_window": 4096, "max_position_embeddings": 32768,
}
SMALL_LLAMA = dict(MISTRAL_7B, model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64,
                   intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=512, max_position_embeddings=4096, sliding_window=None)

# The "Beyonder-4x7B-v3" recipe of BRIEF §1: the base is also the first expert.
BEYONDER = {
    "base_model": "mlabonne/AlphaMonarch-7B",
    "gate_mode": "hidden",
    "dtype": "bfloat16",
    "experts_per_token": 2,
    "seed": 1234,
    "experts": [
        {"source_model": "mlabonne/AlphaMonarch-7B", "positive_prompts": ["chat", "assistant", "tell me", "explain", "I want"]},
        {"source_model": "beowolx/CodeNinja-1.0-OpenChat-7B", "positive_prompts": ["code", "python", "javascript", "programming", "algorithm"]},
        {"source_model": "SanjiWatsuki/Kunoichi-DPO-v2-7B", "positive_prompts": ["storywriting", "write", "scene", "story", "character"]},
        {"source_model": "mlabonne/NeuralDaredevil-7B", "positive_prompts": ["reason", "math", "mathematics", "solve", "count"]},
    ],
}  # fmt: skip
BEYONDER_GGUF = [
    card.GGUFFile("Beyonder-4x7B-v3.F16.gguf", 48_310_000_000),
    card.GGUFFile("Beyonder-4x7B-v3.Q8_0.gguf", 25_670_000_000),
    card.GGUFFile("Beyonder-4x7B-v3.Q5_K_M.gguf", 17_130_000_000),
    card.GGUFFile("Beyonder-4x7B-v3.Q4_K_M.gguf", 14_640_000_000),
]

# Local folders, a pinned Hub revision, a random router and prompts full of Markdown table hazards.
LOCAL_RANDOM = {
    "base_model": "/models/base",
    "gate_mode": "random",
    "dtype": "float16",
    "experts_per_token": 1,
    "seed": 7,
    "experts": [
        {"source_model": "/models/coder", "positive_prompts": ["a | b", "line one\nline two", "<|im_start|> `x` *bold*"],
         "negative_prompts": ["```fenced```"], "noise_scale": 0.01},
        {"source_model": "org/Expert-7B@v1.0", "residual_scale": 0.5},
        {"source_model": "/models/base"},
    ],
}  # fmt: skip


# ------------------------------------------------------------------------------------------- helpers


def _shapes(c: dict) -> dict[str, tuple[int, ...]]:
    H, I, V, L = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    hd = H // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for layer in range(L):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (H, H), p + "self_attn.k_proj.weight": (kv, H),
            p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, H),
            p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I),
        })  # fmt: skip
    return shapes


def synthetic_plan(config: dict, model_config: dict, *, layout: str = "classic"):
    """A real MergePlan over header-only ModelInfos: no files, no network, exact 7B-sized numbers."""
    moe = load_config(config)
    models = {}
    for ref in moe.model_refs():
        if ref.startswith("/"):
            mref = ModelRef(ref, local_path=Path(ref))
        else:
            repo_id, _, revision = ref.partition("@")
            mref = ModelRef(ref, repo_id=repo_id, revision=revision or None)
        tensors = {
            name: TensorInfo(name, "BF16", shape, Path("/nonexistent/model.safetensors"), 0, 2 * _numel(shape))
            for name, shape in _shapes(model_config).items()
        }
        models[ref] = ModelInfo(mref, dict(model_config), tensors, None, sum(t.nbytes for t in tensors.values()))
    return build_plan(moe, models, layout=layout)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("LAZYMOE_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.is_file(), f"{path} is missing; create it with LAZYMOE_UPDATE_GOLDEN=1 python -m pytest {__file__}"
    expected = path.read_text(encoding="utf-8")
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True), str(path), "rendered"))
        pytest.fail(f"{name} differs from the golden file:\n{diff}\nIf the change is intended, regenerate with "
                    "LAZYMOE_UPDATE_GOLDEN=1 and review the diff.", pytrace=False)


def front_matter(text: str) -> dict:
    """The metadata exactly as the Hub reads it (huggingface_hub's own parser and card-data class)."""
    from huggingface_hub import ModelCard

    assert text.startswith("---\n"), "a card must start with its YAML front matter"
    return ModelCard(text).data.to_dict()


def section(text: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"the card has no '## {title}' section"
    return match.group(1)


def code_blocks(text: str, lang: str) -> list[str]:
    return [m.group(2) for m in re.finditer(rf"^(`{{3,}}){lang}\n(.*?)\n\1$", text, re.S | re.M)]


def table_rows(text: str) -> list[list[str]]:
    """Cells of each Markdown table row, splitting on unescaped pipes only (as GFM does)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = re.split(r"(?<!\\)\|", line)
            assert cells[0] == "" and cells[-1] == "", f"row does not start and end with a pipe: {line!r}"
            rows.append([c.strip() for c in cells[1:-1]])
    return rows


@pytest.fixture
def beyonder_folder(tmp_path) -> Path:
    folder = tmp_path / "Beyonder-4x7B-v3"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    (folder / "routing.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return folder


@pytest.fixture
def beyonder_card(beyonder_folder) -> str:
    plan = synthetic_plan(BEYONDER, MISTRAL_7B)
    path = card.write_card(plan, beyonder_folder, repo_id="mlabonne/Beyonder-4x7B-v3",
                           gguf_files=BEYONDER_GGUF, routing_image="routing.png")
    assert path == beyonder_folder / "README.md"
    return path.read_text(encoding="utf-8")


@pytest.fixture
def local_card(tmp_path) -> str:
    folder = tmp_path / ".local-moe.lazymoe-partial-4242"  # the name merge() writes under
    folder.mkdir()
    plan = synthetic_plan(LOCAL_RANDOM, SMALL_LLAMA, layout="fused")
    return card.write_card(plan, folder, license="MIT").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------- golden files


def test_golden_beyonder_card(beyonder_card):
    assert_golden("model_card_beyonder.md", beyonder_card)


def test_golden_local_random_card(local_card):
    assert_golden("model_card_local_random.md", local_card)


def test_golden_gguf_card():
    data = gguf_card.gguf_card_data(BEYONDER_GGUF, base_repo_id="mlabonne/Beyonder-4x7B-v3")
    assert_golden("gguf_card_beyonder.md", render.render_gguf_card(data))


# ------------------------------------------------------------------------------------------- front matter


def test_front_matter_has_the_hub_fields(beyonder_card):
    meta = front_matter(beyonder_card)
    assert meta["license"] == "apache-2.0"
    # de-duplicated (AlphaMonarch is base and expert), base first, in the config's order
    assert meta["base_model"] == ["mlabonne/AlphaMonarch-7B", "beowolx/CodeNinja-1.0-OpenChat-7B",
                                  "SanjiWatsuki/Kunoichi-DPO-v2-7B", "mlabonne/NeuralDaredevil-7B"]
    assert meta["base_model_relation"] == "merge"
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"moe", "frankenmoe", "merge", "lazymoe", "mixtral"} <= set(meta["tags"])
    # and it is exactly what yaml.safe_dump wrote, not hand-formatted text
    block = beyonder_card.split("---\n")[1]
    assert yaml.safe_load(block) == meta
    assert block == yaml.safe_dump(yaml.safe_load(block), sort_keys=False, allow_unicode=True)


def test_local_paths_stay_out_of_base_model_but_stay_in_the_card(local_card):
    meta = front_matter(local_card)
    assert meta["base_model"] == ["org/Expert-7B"], "only Hub ids, without @revision"
    assert meta["license"] == "mit", "license ids are normalised to the Hub's lower case"
    intro = local_card.split("## Experts")[0]
    assert "`/models/base`" in intro and "`/models/coder`" in intro
    assert "[org/Expert-7B@v1.0](https://huggingface.co/org/Expert-7B/tree/v1.0)" in intro


def test_all_local_sources_leave_base_model_out(tmp_path):
    config = dict(LOCAL_RANDOM, experts=[e for e in LOCAL_RANDOM["experts"] if e["source_model"].startswith("/")])
    facts = card.ModelFacts.from_plan(synthetic_plan(config, SMALL_LLAMA), tmp_path)
    meta = front_matter(card.render_card(card.card_data(facts)))
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert meta["library_name"] == "transformers"


def test_gguf_card_front_matter():
    text = render.render_gguf_card(gguf_card.gguf_card_data(BEYONDER_GGUF, base_repo_id="me/Moe", license="llama3"))
    meta = front_matter(text)
    assert meta["base_model"] == "me/Moe" and meta["base_model_relation"] == "quantized"
    assert meta["license"] == "llama3" and "gguf" in meta["tags"]


# ------------------------------------------------------------------------------------------- content


def test_intro_links_every_source_model_once(beyonder_card):
    intro = beyonder_card.split("## Experts")[0]
    for ref in {BEYONDER["base_model"], *(e["source_model"] for e in BEYONDER["experts"])}:
        assert intro.count(f"[{ref}](https://huggingface.co/{ref})") >= 1, ref
    assert "# Beyonder-4x7B-v3\n" in beyonder_card


def test_details_show_parameters_in_human_units(beyonder_card):
    details = dict(row for row in table_rows(section(beyonder_card, "Model details"))[2:])
    assert details["Parameters"].startswith("24.2B total (24,153,690,112), 12.9B active per token (12,879,400,960)")
    assert details["Experts"] == "4, 2 per token"
    assert details["dtype"] == "bfloat16"
    assert details["Gate mode"].startswith("`hidden`:")


def test_expert_table_escapes_pipes_and_newlines(local_card):
    rows = table_rows(section(local_card, "Experts"))
    header, _rule, *experts = rows
    assert header == ["#", "Expert", "Positive prompts", "Negative prompts", "Settings"]
    assert len(experts) == 3 and all(len(r) == len(header) for r in experts), rows
    coder = experts[0]
    assert coder[2] == r"• a \| b<br>• line one<br>line two<br>• \<\|im\_start\|\> \`x\` \*bold\*"
    assert coder[3] == r"• \`\`\`fenced\`\`\`" and coder[4] == "noise\\_scale 0.01"
    assert experts[1][2] == "—" and experts[1][4] == "residual\\_scale 0.5"


def test_configuration_block_is_the_saved_recipe_byte_for_byte(beyonder_folder):
    plan = synthetic_plan(BEYONDER, MISTRAL_7B)
    saved = "# as merge() saved it\n" + plan.config.to_yaml()
    (beyonder_folder / card.CONFIG_FILENAME).write_text(saved, encoding="utf-8")
    text = card.write_card(plan, beyonder_folder).read_text(encoding="utf-8")
    assert code_blocks(section(text, "Configuration"), "yaml") == [saved.rstrip("\n")]


def test_fenced_blocks_survive_backticks_in_prompts(local_card):
    (block,) = code_blocks(section(local_card, "Configuration"), "yaml")
    assert yaml.safe_load(block)["experts"][0]["negative_prompts"] == ["```fenced```"]


def test_optional_sections_appear_only_when_given(beyonder_card, local_card):
    assert "## GGUF" in beyonder_card and "## Routing" in beyonder_card
    assert "## GGUF" not in local_card and "## Routing" not in local_card
    assert "![Routing of Beyonder-4x7B-v3: which experts the router picks](routing.png)" in beyonder_card
    gguf = section(beyonder_card, "GGUF")
    assert "[mlabonne/Beyonder-4x7B-v3-GGUF](https://huggingface.co/mlabonne/Beyonder-4x7B-v3-GGUF)" in gguf
    assert code_blocks(gguf, "bash") == ["llama-cli -hf mlabonne/Beyonder-4x7B-v3-GGUF:Q4_K_M"]
    names = [r[0] for r in table_rows(gguf)[2:]]
    assert names == ["`Beyonder-4x7B-v3.Q4_K_M.gguf`", "`Beyonder-4x7B-v3.Q5_K_M.gguf`",
                     "`Beyonder-4x7B-v3.Q8_0.gguf`", "`Beyonder-4x7B-v3.F16.gguf`"], "smallest first"


def test_gguf_section_with_only_a_repo_or_only_files(tmp_path):
    facts = card.ModelFacts.from_plan(synthetic_plan(BEYONDER, MISTRAL_7B), tmp_path)
    text = card.render_card(card.card_data(facts, gguf_repo="me/Moe-GGUF"))
    gguf = section(text, "GGUF")
    assert code_blocks(gguf, "bash") == ["llama-cli -hf me/Moe-GGUF"], "llama.cpp then picks its default quant"
    assert "| File |" not in gguf

    text = card.render_card(card.card_data(facts, gguf_files=BEYONDER_GGUF[:1]))  # files, but no repo known
    gguf = section(text, "GGUF")
    assert "converted from this model" in gguf and code_blocks(gguf, "bash") == []
    assert [r[0] for r in table_rows(gguf)[2:]] == ["`Beyonder-4x7B-v3.F16.gguf`"]


def test_model_name_comes_from_the_final_folder_name(local_card):
    assert local_card.split("---\n", 2)[2].lstrip().startswith("# local-moe\n")
    assert 'model_id = "your-username/local-moe"' in local_card


def test_gguf_card_usage():
    text = render.render_gguf_card(gguf_card.gguf_card_data(BEYONDER_GGUF, base_repo_id="me/Moe"))
    usage = section(text, "Usage")
    assert code_blocks(usage, "bash") == ["llama-cli -hf me/Moe-GGUF:Q4_K_M"]
    (snippet,) = code_blocks(usage, "python")
    calls = {}

    class Llama:  # stands in for llama_cpp.Llama: records what the snippet asks for
        @classmethod
        def from_pretrained(cls, **kwargs):
            calls.update(kwargs)
            return cls()

        def create_chat_completion(self, messages, max_tokens):
            calls["messages"] = messages
            return {"choices": [{"message": {"content": "ok"}}]}

    fake = types.ModuleType("llama_cpp")
    fake.Llama = Llama
    saved = sys.modules.get("llama_cpp")
    sys.modules["llama_cpp"] = fake
    try:
        exec(compile(snippet, "<gguf card>", "exec"), {})
    finally:
        if saved is None:
            sys.modules.pop("llama_cpp")
        else:
            sys.modules["llama_cpp"] = saved
    assert calls["repo_id"] == "me/Moe-GGUF" and calls["filename"] == "Beyonder-4x7B-v3.Q4_K_M.gguf"
    assert calls["messages"][0]["role"] == "user"


# ------------------------------------------------------------------------------------------- strictness


@pytest.mark.parametrize("path", [("gate_mode_note",), ("usage", "chat"), ("experts", 0, "source")])
def test_a_missing_field_fails_the_render(tmp_path, path):
    data = card.card_data(card.ModelFacts.from_plan(synthetic_plan(BEYONDER, MISTRAL_7B), tmp_path))
    card.render_card(data)  # complete data renders
    holder = data
    for key in path[:-1]:
        holder = holder[key]
    del holder[path[-1]]
    with pytest.raises(jinja2.UndefinedError, match=repr(path[-1]) if isinstance(path[-1], str) else None):
        card.render_card(data)


def test_a_missing_gguf_field_fails_the_render():
    data = gguf_card.gguf_card_data(BEYONDER_GGUF, base_repo_id="me/Moe")
    del data["files"][0]["size"]
    with pytest.raises(jinja2.UndefinedError, match="size"):
        render.render_gguf_card(data)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"license": "Apache 2.0"}, "not a Hub license id"),  # spaces: the Hub would reject the metadata
        ({"routing_image": "../elsewhere.png"}, "not inside"),  # would not be uploaded with the card
        ({"routing_image": "missing.png"}, "does not exist"),
        ({"gguf_files": ["nowhere.Q4_K_M.gguf"]}, "does not exist"),
        ({"repo_id": "MyMoE"}, "namespace/name"),  # from_pretrained("MyMoE") would look for a local folder
    ],
)
def test_bad_options_are_refused_with_the_fix(beyonder_folder, kwargs, message):
    with pytest.raises(card.CardError, match=message):
        card.write_card(synthetic_plan(BEYONDER, MISTRAL_7B), beyonder_folder, **kwargs)
    assert not (beyonder_folder / "README.md").exists(), "a refused card leaves no file behind"


def test_gguf_card_needs_a_hub_id_and_files():
    with pytest.raises(card.CardError, match="namespace/name"):
        gguf_card.gguf_card_data(BEYONDER_GGUF, base_repo_id="local-folder")
    with pytest.raises(card.CardError, match="at least one"):
        gguf_card.gguf_card_data([], base_repo_id="me/Moe")


@pytest.mark.parametrize(
    "text, escaped",
    [
        ("a | b", r"a \| b"),  # a bare pipe would end the table cell
        ("one\ntwo\r\nthree", "one<br>two<br>three"),  # a newline would end the table row
        ("<script>", r"\<script\>"),  # raw HTML would be rendered (or stripped) by the Hub
        ("snake_case *x* [link]", r"snake\_case \*x\* \[link\]"),
        ("Q&A ~~x~~ \\", r"Q\&A \~\~x\~\~ \\"),
        ("  plain words  ", "plain words"),
    ],
)
def test_md_escape(text, escaped):
    assert render.md_escape(text) == escaped


def test_md_code_and_fence_outlast_backticks():
    assert render.md_code("/models/base") == "`/models/base`"
    assert render.md_code("a`b|c") == "``a`b\\|c``"
    assert render.md_fenced("x: 1\n", "yaml") == "```yaml\nx: 1\n```"
    assert render.md_fenced("p: ````four````\n") == "`````\np: ````four````\n`````"


def test_gguf_quant_names():
    assert card.GGUFFile("Moe-4x7B.Q4_K_M.gguf", 1).quant == "Q4_K_M"
    assert card.GGUFFile("moe.f16.gguf", 1).quant == "F16"
    assert card.GGUFFile("model.gguf", 1).quant is None
    assert card.GGUFFile("Moe-v3.1.gguf", 1).quant is None, "a version number is not a quant type"
    assert card.GGUFFile("Moe-v3.1.IQ4_XS.gguf", 1).quant == "IQ4_XS"


def test_find_gguf_files_reads_sizes_smallest_first(tmp_path):
    (tmp_path / "m.Q8_0.gguf").write_bytes(b"x" * 30)
    (tmp_path / "m.Q4_K_M.gguf").write_bytes(b"x" * 10)
    (tmp_path / "notes.txt").write_text("ignored")
    assert card.find_gguf_files(tmp_path) == [card.GGUFFile("m.Q4_K_M.gguf", 10), card.GGUFFile("m.Q8_0.gguf", 30)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(card.CardError, match=r"no \*\.gguf files"):
        card.find_gguf_files(tmp_path / "empty")


def test_templates_ship_with_the_package(tmp_path):
    """The wheel carries every template of the top-level templates/ folder, byte for byte, where render reads them."""
    import subprocess
    import sys
    import zipfile

    templates = sorted(p.name for p in (REPO_ROOT / "templates").glob("*.j2"))
    assert {render.MODEL_TEMPLATE, render.GGUF_TEMPLATE} <= set(templates)
    for name in templates:
        assert render._template_source(name) == (REPO_ROOT / "templates" / name).read_text(encoding="utf-8")
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout (links kept as links)
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "lazymoe", "templates"):
        copy = shutil.copytree if (REPO_ROOT / name).is_dir() else shutil.copy2
        copy(REPO_ROOT / name, src / name, **({"symlinks": True} if copy is shutil.copytree else {}))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("lazymoe-*.whl")
    with zipfile.ZipFile(wheel) as z:
        for name in templates:
            assert z.read(f"lazymoe/publish/templates/{name}") == (REPO_ROOT / "templates" / name).read_bytes()


# ------------------------------------------------------------------------------------------- a real merged model


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    """A tiny real MoE built by merge() from the demo experts; merge() writes its card itself."""
    from lazymoe import merge
    from lazymoe.demo import build_demo

    root = tmp_path_factory.mktemp("card_demo")
    return merge(build_demo(root / "inputs"), root / "tiny-moe", progress=False)


@pytest.mark.slow
def test_merge_writes_the_card_the_folder_alone_rebuilds(merged):
    from lazymoe.pipeline.merge import make_plan

    written = (merged / "README.md").read_text(encoding="utf-8")
    assert written == card.build_card(merged), "merge() and `lazymoe card` must produce the same card"
    plan = make_plan(merged / card.CONFIG_FILENAME, progress=False)
    assert card.ModelFacts.from_plan(plan, merged) == card.ModelFacts.from_folder(merged)
    assert written.split("---\n", 2)[2].lstrip().startswith("# tiny-moe\n")
    (yaml_block,) = code_blocks(section(written, "Configuration"), "yaml")
    assert yaml_block == (merged / card.CONFIG_FILENAME).read_text(encoding="utf-8").rstrip("\n")


def _without_chat_template(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("chat", [True, False], ids=["chat-template", "plain-prompt"])
def test_usage_snippet_runs_against_the_merged_model(merged, tmp_path, capsys, chat):
    pytest.importorskip("accelerate", reason="the card's snippet uses device_map='auto', which needs accelerate")
    folder = merged if chat else _without_chat_template(merged, tmp_path / "no-chat")
    text = card.build_card(folder, repo_id="someone/tiny-moe")
    blocks = code_blocks(section(text, "Usage"), "python")
    assert len(blocks) == 2, "one block to run anywhere, one 4-bit block that needs a CUDA GPU"
    snippet = blocks[0]
    assert ("apply_chat_template" in snippet) is chat
    assert "torch_dtype" not in text and "load_in_4bit" not in snippet
    runnable = snippet.replace('model_id = "someone/tiny-moe"', f"model_id = {str(folder)!r}")
    runnable = runnable.replace("max_new_tokens=256", "max_new_tokens=3")
    assert runnable.count(repr(str(folder))) == 1 and "max_new_tokens=3" in runnable, "the snippet changed shape"
    namespace: dict = {}
    exec(compile(runnable, "<model card usage>", "exec"), namespace)
    assert namespace["outputs"].shape[-1] > namespace["inputs"]["input_ids"].shape[-1], "nothing was generated"
    assert type(namespace["model"]).__name__ == "MixtralForCausalLM"
    assert capsys.readouterr().out.endswith("\n"), "the snippet prints its answer"


@pytest.mark.slow
def test_four_bit_snippet_builds_a_quantization_config(merged, monkeypatch):
    """bitsandbytes needs CUDA, so loading is intercepted: the code up to from_pretrained runs for real."""
    import transformers

    text = card.build_card(merged, repo_id="someone/tiny-moe")
    snippet = code_blocks(section(text, "Usage"), "python")[1]
    calls = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda cls, *args, **kwargs: calls.append((args, kwargs))))
    exec(compile(snippet.replace('"someone/tiny-moe"', repr(str(merged))), "<4-bit usage>", "exec"), {})
    ((args, kwargs),) = calls
    assert args == (str(merged),)
    assert "load_in_4bit" not in kwargs and "torch_dtype" not in kwargs, "transformers 5 refuses these kwargs"
    config = kwargs["quantization_config"]
    assert isinstance(config, transformers.BitsAndBytesConfig) and config.load_in_4bit
    assert kwargs["device_map"] == "auto"
    calls_in_code = [n for n in ast.walk(ast.parse(snippet)) if isinstance(n, ast.Call)]
    assert any(getattr(c.func, "id", None) == "BitsAndBytesConfig" for c in calls_in_code)


@pytest.mark.slow
def test_cli_card_renders_from_the_folder(merged, tmp_path, capsys):
    parser = build_parser()
    folder = shutil.copytree(merged, tmp_path / "copy")
    (folder / "README.md").unlink()

    args = parser.parse_args(["card", str(folder), "--repo-id", "me/Tiny-4x", "--stdout"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert printed == card.build_card(folder, repo_id="me/Tiny-4x") and not (folder / "README.md").exists()
    assert printed.split("---\n", 2)[2].lstrip().startswith("# Tiny-4x\n")

    (folder / "plot.png").write_bytes(b"png")
    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    (gguf_dir / "Tiny-4x.Q4_K_M.gguf").write_bytes(b"g" * 2048)
    args = parser.parse_args(["card", str(folder), "--repo-id", "me/Tiny-4x", "--license", "mit",
                              "--gguf-dir", str(gguf_dir), "--routing-image", "plot.png"])
    assert args.func(args) == 0
    assert capsys.readouterr().out == f"Wrote {folder / 'README.md'}\n"
    written = (folder / "README.md").read_text(encoding="utf-8")
    assert front_matter(written)["license"] == "mit" and "](plot.png)" in written
    assert "llama-cli -hf me/Tiny-4x-GGUF:Q4_K_M" in written and "2.0 KB" in written

    args = parser.parse_args(["card", str(gguf_dir), "--gguf-of", "me/Tiny-4x"])
    assert args.func(args) == 0
    assert front_matter((gguf_dir / "README.md").read_text())["base_model"] == "me/Tiny-4x"


@pytest.mark.slow
def test_rerender_refuses_folders_lazymoe_did_not_build(merged, tmp_path):
    folder = shutil.copytree(merged, tmp_path / "copy")
    (folder / card.CONFIG_FILENAME).unlink()
    with pytest.raises(ModelNotFoundError, match="lazymoe_config.yml"):
        card.rerender_card(folder)

    folder = shutil.copytree(merged, tmp_path / "edited")
    config = json.loads((folder / "config.json").read_text())
    config["num_experts_per_tok"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(card.CardError, match="edited after the merge"):
        card.rerender_card(folder)
