"""Property-based hostility (issue 11): whatever config, model reference, size or safetensors header a user
(or a damaged download) hands lazymoe, the only exceptions are lazymoe's own error classes.

The default profile is short and deterministic (CI); ``HYPOTHESIS_PROFILE=long`` searches much further.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazymoe import checks
from lazymoe.config import load_config, parse_config
from lazymoe.errors import LazyMoEError
from lazymoe.plan import build_plan, parse_bytes
from lazymoe.sources import ModelRef, describe

settings.register_profile("ci", max_examples=120, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture",
          "seed", "allow_all_same_experts", "license", "router_chat_template", "router_continuation_tokens"]
EXPERT_FIELDS = ["source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"]
VALID = {
    "base_model": "org/base",
    "gate_mode": "hidden",
    "experts": [{"source_model": "org/a", "positive_prompts": ["code"]},
                {"source_model": "org/b", "positive_prompts": ["chat"]}],
}


@given(st.text(max_size=200))
def test_any_yaml_text_parses_or_is_a_config_error(text):
    try:
        load_config(text + "\n")  # a newline: always YAML text, never taken for a file name
    except LazyMoEError:
        pass


@given(json_values)
def test_any_value_as_a_config_is_a_config_error_or_a_config(value):
    try:
        parse_config(value)
    except LazyMoEError:
        pass
    try:
        load_config(yaml.safe_dump(value) + "\n")
    except LazyMoEError:
        pass


@given(st.sampled_from(FIELDS), json_values, st.sampled_from(EXPERT_FIELDS), json_values)
def test_a_valid_config_with_one_field_replaced_is_a_config_error_or_a_config(field, value, expert_field, expert_value):
    for data in ({**VALID, field: value},
                 {**VALID, "experts": [{**VALID["experts"][0], expert_field: expert_value}, VALID["experts"][1]]}):
        try:
            config = parse_config(data)
        except LazyMoEError:
            continue
        config.to_yaml()  # what merge saves must serialise
        if config.seed is not None:
            assert 0 <= config.seed < 2**63


@given(st.text(max_size=60) | st.text(alphabet="ab/.@~", min_size=250, max_size=400))
def test_any_model_reference_parses_or_is_a_model_error(text):
    try:
        ref = ModelRef.parse(text)
    except LazyMoEError:
        return
    assert (ref.local_path is None) != (ref.repo_id is None)


@given(st.one_of(st.text(max_size=40), st.integers(), st.floats().map(str), st.booleans()))
def test_any_size_parses_to_a_positive_byte_count_or_is_a_config_error(value):
    try:
        size = parse_bytes(value)
    except LazyMoEError:
        return
    assert isinstance(size, int) and size >= 1


# ------------------------------------------------------------------------------------ safetensors headers


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from lazymoe.demo import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("prop")
    tok = build_tokenizer(root / "tok", vocab_size=400)
    return build_model(root / "m", tokenizer_dir=tok, seed=0, num_hidden_layers=1, hidden_size=8,
                       intermediate_size=16, num_attention_heads=2, num_key_value_heads=1)


def _describe_copy(model: Path, weights: bytes):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "m"
        folder.mkdir()
        shutil.copy(model / "config.json", folder / "config.json")
        (folder / "model.safetensors").write_bytes(weights)
        try:
            info = describe(ModelRef.parse(str(folder)))
        except LazyMoEError:
            return None
        size = len(weights)
        for t in info.tensors.values():  # whatever was accepted describes bytes the file really holds
            assert 0 <= t.offset and t.offset + t.nbytes <= size
        return info


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_bytes_as_weights_are_a_model_error(model, data):
    _describe_copy(model, data)
    _describe_copy(model, struct.pack("<Q", len(data)) + data)  # a plausible length in front


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.data())
def test_a_mutated_header_is_a_model_error_or_a_consistent_model(model, data):
    raw = (model / "model.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    names = sorted(header)
    name = data.draw(st.sampled_from(names))
    target = data.draw(st.sampled_from([None, "dtype", "shape", "data_offsets", "extra"]))
    value = data.draw(json_values | st.lists(st.integers(-5, 10**13), max_size=3) | st.sampled_from(
        ["F8_E4M3", "BF16", "F64", "I8", "BOOL", "U64"]))
    if target is None or not isinstance(header[name], dict):
        header[name] = value
    else:
        header[name][target] = value
    body = json.dumps(header).encode()
    cut = data.draw(st.integers(0, len(raw) - 8 - size))
    weights = struct.pack("<Q", len(body)) + body + raw[8 + size:8 + size + cut]
    info = _describe_copy(model, weights)
    if info is None:
        return
    # the compatibility checks and the planner accept it or refuse it in one of our messages
    config = parse_config({**VALID, "base_model": "m", "experts": [
        {"source_model": "m", "positive_prompts": ["a"]}, {"source_model": "m", "positive_prompts": ["b"]}],
        "allow_all_same_experts": True})
    models = {"m": info}
    try:
        checks.check_models(config, models)
        build_plan(config, models)
    except LazyMoEError:
        pass
