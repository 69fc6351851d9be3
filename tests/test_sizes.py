"""Bare sizes as models (lora_budget.sizes): the usual model per size, the nearest catalog model, Llama-shaped
stand-ins."""

from __future__ import annotations

import pytest

from lora_budget.errors import UnknownModelError
from lora_budget.models import get_model, list_models
from lora_budget.params import count_params
from lora_budget.sizes import (CATALOG_TOLERANCE, PREFERRED, SCALED_TOLERANCE, is_bare_size, nearest_catalog,
                               parse_param_size, resolve_size, scaled_llama, size_label)

#: Marketed sizes are rounded labels: Gemma-2 "2B" has 2.61B parameters (+31 %), Phi-3-mini "3.8B" 3.82B.  A
#: PREFERRED entry further than this from its label is a typo in the table.
LABEL_TOLERANCE = 0.35


def total(spec) -> int:
    return count_params(spec).total


@pytest.mark.parametrize("text, name", [
    ("65B", "llama-65b"), ("65b", "llama-65b"), ("7b", "llama-2-7b"), ("7B", "llama-2-7b"),
    ("70B", "llama-3.1-70b"), ("70 billion", "llama-3.1-70b"), ("8x7B", "mixtral-8x7b"), ("8 x 7b", "mixtral-8x7b"),
    ("8x22B", "mixtral-8x22b"), ("1.5b", "qwen2.5-1.5b"), ("405B", "llama-3.1-405b"), ("8B", "llama-3.1-8b"),
    ("13B", "llama-2-13b"), ("500M", "qwen2.5-0.5b"), ("0.5B", "qwen2.5-0.5b"), ("30B", "llama-33b"),
    ("175B", "gpt3-175b"),
])
def test_usual_model_per_size(text, name):
    res = resolve_size(text)
    assert res.spec.name == name
    assert res.explanation.startswith(repr(text.strip()))
    assert f"{total(res.spec):,}" in res.explanation


@pytest.mark.parametrize("label", sorted(PREFERRED))
def test_preferred_table_names_catalog_models_near_their_label(label):
    name, reason = PREFERRED[label]
    spec = get_model(name)
    assert reason
    experts, n = parse_param_size(label)
    if experts:
        assert spec.num_local_experts == experts
    else:
        assert abs(total(spec) - n) / n <= LABEL_TOLERANCE, (label, name, total(spec))


@pytest.mark.parametrize("text, name", [
    ("6.7B", "llama-2-7b"),      # llama-7b has the same count: ties go to the PREFERRED model
    ("12B", "llama-2-13b"),      # +8.5 %, within CATALOG_TOLERANCE
    ("7.6B", "qwen2.5-7b"),      # qwen2-7b has the same count: ties go to the newer release
    ("7.2B", "mistral-7b"),
    ("34B", "qwen2.5-32b"),
])
def test_nearest_catalog_model(text, name):
    res = resolve_size(text)
    assert res.spec.name == name
    assert "nearest" in res.explanation
    _, n = parse_param_size(text)
    assert abs(total(res.spec) - n) / n <= CATALOG_TOLERANCE


def test_nearest_catalog_is_none_beyond_tolerance_and_skips_moe():
    assert nearest_catalog(20 * 10**9) is None
    mixtral = total(get_model("mixtral-8x7b"))
    near = nearest_catalog(mixtral)
    assert near is None or not near.is_moe


@pytest.mark.parametrize("name", ["llama-7b", "llama-13b", "llama-33b", "llama-65b", "llama-2-70b"])
def test_scaling_rule_reproduces_the_llama_family(name):
    """The stand-in rule, asked for the exact count of a LLaMA-1/2 model, rebuilds that model's shape."""
    ref = get_model(name)
    spec = scaled_llama(total(ref)).spec
    got = (spec.hidden_size, spec.intermediate_size, spec.num_hidden_layers, spec.num_attention_heads,
           spec.num_key_value_heads, spec.vocab_size)
    want = (ref.hidden_size, ref.intermediate_size, ref.num_hidden_layers, ref.num_attention_heads,
            ref.num_key_value_heads, ref.vocab_size)
    assert got == want
    assert total(spec) == total(ref)


SCALED_SIZES = [10**8, 2 * 10**8, 3 * 10**8, 6 * 10**8, 2 * 10**9, 4.5e9, 6e9, 10**10, 2 * 10**10, 4 * 10**10,
                5 * 10**10, 9 * 10**10, 1.2e11, 2.5e11, 5 * 10**11, 10**12, 2 * 10**12]


@pytest.mark.parametrize("n", [int(x) for x in SCALED_SIZES])
def test_scaled_llama_lands_near_the_size(n):
    res = scaled_llama(n)
    spec = res.spec
    assert spec.model_type == "llama"
    assert spec.vocab_size == 32000
    assert spec.num_attention_heads * spec.d_head == spec.hidden_size
    assert spec.num_attention_heads % spec.num_key_value_heads == 0
    assert spec.num_hidden_layers >= 1
    assert abs(total(spec) - n) / n <= SCALED_TOLERANCE
    assert f"{total(spec):,} parameters" in res.explanation


@pytest.mark.parametrize("text", ["20B", "6B", "40B", "120B", "1T"])
def test_resolve_size_builds_a_stand_in_when_no_catalog_model_is_near(text):
    res = resolve_size(text)
    assert res.spec.name.startswith("llama-shaped-")
    assert "no catalog model within" in res.explanation and "Llama-shaped" in res.explanation
    _, n = parse_param_size(text)
    assert abs(total(res.spec) - n) / n <= SCALED_TOLERANCE


def test_moe_size_not_in_the_table_builds_a_mixtral_layout():
    res = resolve_size("4x7B")
    spec = res.spec
    base = get_model(PREFERRED["7B"][0])
    assert spec.model_type == "mixtral" and spec.num_local_experts == 4 and spec.num_experts_per_tok == 2
    assert (spec.hidden_size, spec.intermediate_size, spec.num_hidden_layers) == (
        base.hidden_size, base.intermediate_size, base.num_hidden_layers)
    # experts share attention and embeddings: more than one 7B, less than four
    assert total(base) < total(spec) < 4 * total(base)
    assert "4 experts" in res.explanation


@pytest.mark.parametrize("text", ["48GB", "24GiB", "llama-7b", "7", "b7", "seven B", ""])
def test_not_bare_sizes(text):
    assert not is_bare_size(text)
    with pytest.raises(UnknownModelError):
        resolve_size(text)


@pytest.mark.parametrize("text", ["50M", "5T", "1x7B", "0B"])
def test_sizes_out_of_range_are_refused(text):
    assert is_bare_size(text)
    with pytest.raises(UnknownModelError) as e:
        resolve_size(text)
    assert "\n" not in str(e.value)


def test_size_label():
    assert size_label(0, 65 * 10**9) == "65B"
    assert size_label(0, 5 * 10**8) == "0.5B"
    assert size_label(8, 7 * 10**9) == "8x7B"
    assert parse_param_size("1.5b") == (0, 1_500_000_000)


def test_every_catalog_model_is_its_own_nearest_size():
    """A size equal to a catalog model's count resolves to a model with exactly that count."""
    for spec in list_models():
        if spec.is_moe:
            continue
        near = nearest_catalog(total(spec))
        assert total(near) == total(spec)
