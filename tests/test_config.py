"""The config schema: mergekit-moe YAML accepted unchanged, every mistake explained before any work."""

from __future__ import annotations

import json

import pytest
import yaml

from lazymoe.config import MoEConfig, load_config
from lazymoe.errors import ConfigError

BEYONDER = """\
base_model: mlabonne/AlphaMonarch-7B
experts:
  - source_model: mlabonne/AlphaMonarch-7B
    positive_prompts: ["chat", "assistant", "tell me", "explain", "I want"]
  - source_model: beowolx/CodeNinja-1.0-OpenChat-7B
    positive_prompts: ["code", "python", "javascript", "programming", "algorithm"]
  - source_model: SanjiWatsuki/Kunoichi-DPO-v2-7B
    positive_prompts: ["storywriting", "write", "scene", "story", "character"]
  - source_model: mlabonne/NeuralDaredevil-7B
    positive_prompts: ["reason", "math", "mathematics", "solve", "count"]
"""


def cfg(**overrides) -> dict:
    data = yaml.safe_load(BEYONDER)
    data.update(overrides)
    return data


def test_beyonder_recipe_parses_with_reference_defaults():
    c = load_config(BEYONDER)
    assert c.gate_mode == "hidden" and c.experts_per_token == 2 and c.dtype is None
    assert c.num_experts == 4 and c.experts[1].source_model == "beowolx/CodeNinja-1.0-OpenChat-7B"
    assert load_config(c.to_yaml()) == c


def test_yaml_round_trip_keeps_every_field():
    data = cfg(gate_mode="cheap_embed", dtype="bf16", experts_per_token=1, seed=3)
    data["experts"][0]["negative_prompts"] = ["code"]
    data["experts"][0]["noise_scale"] = 0.01
    data["experts"][1]["residual_scale"] = 0.9
    c = load_config(data)
    assert c.dtype == "bfloat16"
    again = load_config(c.to_yaml())
    assert again == c and again.experts[0].negative_prompts == ["code"]


def test_with_seed_pins_randomness_once():
    c = load_config(cfg(gate_mode="random"))
    seeded = c.with_seed()
    assert isinstance(seeded.seed, int) and seeded.with_seed() is seeded


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (cfg(gate_mod="hidden"), "Unknown key 'gate_mod' in the config. Did you mean 'gate_mode'?"),
        (cfg(experts=[{"source_model": "a/b", "positive_promts": ["x"]}, {"source_model": "c/d"}]),
         "Unknown key 'positive_promts' in experts[0]. Did you mean 'positive_prompts'?"),
        (cfg(gate_mode="hiden"), "gate_mode: 'hiden' is not allowed; use one of hidden,"),
        (cfg(gate_mode="hiden"), "Did you mean 'hidden'?"),
        (cfg(dtype="int8"), "dtype: 'int8' is not allowed; use one of bfloat16, float16, float32."),
        (cfg(experts_per_token=0), "experts_per_token is 0 but must be between 1 and the number of experts (4)"),
        (cfg(experts_per_token=5), "experts_per_token is 5 but must be between 1"),
        (cfg(experts_per_token="two"), "experts_per_token"),
        ({"experts": []}, "base_model is required but missing from the config."),
        ({"base_model": "a/b"}, "experts is required"),
        (cfg(experts=[{"source_model": "a/b", "positive_prompts": ["x"]}]), "at least 2 experts"),
        (cfg(experts=[{"source_model": "a/b", "positive_prompts": ["x"]}, {"source_model": "c/d"}]),
         "experts[1] (c/d) has no positive_prompts, which gate_mode 'hidden' needs"),
        (cfg(experts=[{"source_model": "a/b", "positive_prompts": ["x"]},
                      {"source_model": "c/d", "positive_prompts": ["x"]}]),
         "The positive and negative prompts are identical for every expert"),
        (cfg(experts=[{"source_model": "a/b", "positive_prompts": ["x"]},
                      {"source_model": "a/b", "positive_prompts": ["y"]}]),
         "Every expert is the same model (a/b)"),
        (cfg(experts=[{"source_model": "", "positive_prompts": ["x"]},
                      {"source_model": "a/b", "positive_prompts": ["y"]}]), "experts[0].source_model: is empty"),
        (cfg(shared_experts=[{"source_model": "a/b"}, {"source_model": "c/d"}]),
         "shared_experts has 2 entries; Qwen MoE (Qwen2-MoE) has one shared expert per layer, so give 0 or 1."),
        (cfg(shared_experts=[{"source_model": "a/b", "noise_scale": -1}]), "shared_experts[0].noise_scale must be >= 0"),
        (cfg(architecture="deepseek"), "architecture 'deepseek': lazymoe does not write it (it needs remote code"),
        (cfg(architecture="gpt2"), "Unknown architecture 'gpt2'; lazymoe writes Mixtral, Qwen MoE, Qwen3 MoE"),
        (cfg(architecture=" "), "Unknown architecture ' '"),
        ("just a string", "must be a mapping"),
    ],
)
def test_bad_configs_name_the_problem_and_the_fix(data, message):
    with pytest.raises(ConfigError) as err:
        load_config(data) if isinstance(data, dict) else load_config(yaml.safe_dump(data))
    assert message in str(err.value)


def test_random_gates_need_no_prompts_and_same_models_can_be_allowed():
    data = cfg(gate_mode="random", experts=[{"source_model": "a/b"}, {"source_model": "a/b"}],
               allow_all_same_experts=True)
    c = load_config(data)
    assert not c.uses_prompts and c.experts[0].positive_prompts == []


def test_noise_scale_must_be_a_non_negative_finite_number():
    data = cfg()
    data["experts"][0]["noise_scale"] = -1
    with pytest.raises(ConfigError, match=r"experts\[0\].noise_scale must be >= 0"):
        load_config(data)


def test_invalid_yaml_reports_the_line():
    with pytest.raises(ConfigError, match="not valid YAML at line 3"):
        load_config("base_model: a/b\nexperts: [\n  - :")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_config_object_is_accepted_as_is():
    c = MoEConfig.model_validate(cfg())
    assert load_config(c) == c


def test_license_is_a_hub_license_id():
    assert load_config(cfg(license="Apache-2.0")).license == "apache-2.0"
    with pytest.raises(ConfigError, match="license: is not a Hub license id; use one like apache-2.0"):
        load_config(cfg(license="my license!"))


@pytest.mark.parametrize(("data", "message"), [
    (cfg(gate_mode="hiden"), "gate_mode: 'hiden' is not allowed; use one of hidden, hidden_last, hidden_avg, cheap_embed, "
                             "random, uniform_random, centroid, classifier, expert_classifier, trained. Did you mean "
                             "'hidden'?"),
    (cfg(gate_mod="hidden"), "Unknown key 'gate_mod' in the config. Did you mean 'gate_mode'?"),
    (cfg(experts=[{"source_model": "a/b", "positive_promts": ["x"]}, {"source_model": "c/d"}]),
     "Unknown key 'positive_promts' in experts[0]. Did you mean 'positive_prompts'?"),
    (cfg(experts=[{"source_model": "a/b", "noise_scale": True}, {"source_model": "c/d"}]),
     "experts[0].noise_scale: must be a number, not true/false (got True)."),
    ({"experts": []}, "base_model is required but missing from the config."),
    (cfg(experts="a/b"), "experts must be a list of mappings, each with source_model and positive_prompts."),
    (cfg(seed=-1), "seed: must be a whole number from 0 to 2**63-1 (9223372036854775807) (got -1)."),
])
def test_a_config_built_in_python_gets_the_one_line_error_load_config_gives(data, message):
    with pytest.raises(ConfigError) as loaded:
        load_config(data)
    with pytest.raises(ConfigError) as built:
        MoEConfig(**data)
    with pytest.raises(ConfigError) as validated:
        MoEConfig.model_validate(data)
    with pytest.raises(ConfigError) as from_json:
        MoEConfig.model_validate_json(json.dumps(data))
    assert str(built.value) == str(validated.value) == str(from_json.value) == str(loaded.value) == message


@pytest.mark.parametrize(("text", "message"), [
    ("{bad", "The config: Invalid JSON: key must be a string at line 1 column 2 (got '{bad')."),
    ("[1]", "The config: Input should be an object (got [1])."),
])
def test_a_config_from_json_that_is_not_one_gets_one_line(text, message):
    with pytest.raises(ConfigError) as err:
        MoEConfig.model_validate_json(text)
    assert str(err.value) == message


def test_python_built_configs_and_experts_are_checked_in_the_same_words():
    from lazymoe.config import ExpertConfig

    # a config that is well-typed but not valid yet (one expert) can be built and completed; using it refuses it
    one = MoEConfig(base_model="a/b", experts=[ExpertConfig(source_model="c/d", positive_prompts=["x"])])
    with pytest.raises(ConfigError, match=r"^A MoE needs at least 2 experts; this config has 1\."):
        load_config(one)
    with pytest.raises(ConfigError) as assigned:
        one.gate_mode = "hiden"
    assert str(assigned.value).startswith("gate_mode: 'hiden' is not allowed; use one of hidden,")
    with pytest.raises(ConfigError) as expert:
        ExpertConfig(source_model="c/d", noise=0.01)
    assert str(expert.value) == "Unknown key 'noise' in the ExpertConfig. Did you mean 'noise_scale'?"
    with pytest.raises(ConfigError) as empty:
        ExpertConfig(source_model=" ")
    assert str(empty.value) == ("source_model: is empty: give a Hub id (org/name), org/name@revision or a local folder "
                                "(got ' ').")
    assert one.gate_mode == "hidden" and one.experts[0].noise_scale is None  # a refused change changes nothing
