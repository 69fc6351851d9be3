"""Catalog entries: unique names, aliases, sources, and parameter counts equal to the HF model classes'."""

from __future__ import annotations

import pytest

from lora_budget.errors import UnknownGPUError, UnknownModelError
from lora_budget.gpus import get_gpu, list_gpus
from lora_budget.models import get_model, list_models
from lora_budget.params import count_params

MODELS = list_models()

#: Totals published with the models (model cards / safetensors metadata) or computed with the HF classes on the
#: meta device in memory-accounting.md section 1.3 - independent of our formula.
PUBLISHED_TOTALS = {
    "llama-2-7b": 6_738_415_616,
    "llama-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "llama-3.1-405b": 405_853_388_800,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "mistral-7b": 7_241_732_096,
    "mixtral-8x7b": 46_702_792_704,
    "qwen2-7b": 7_615_616_512,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-0.5b": 494_032_768,
    "gemma-7b": 8_537_680_896,
    "phi-3-mini": 3_821_079_552,
}


def test_catalog_size_and_required_models():
    names = {m.name for m in MODELS}
    assert len(MODELS) >= 30
    for need in ("llama-7b", "llama-13b", "llama-33b", "llama-65b", "llama-2-7b", "llama-2-13b", "llama-2-70b",
                 "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "llama-3.2-1b", "llama-3.2-3b", "mistral-7b",
                 "mixtral-8x7b", "qwen2.5-0.5b", "qwen2.5-72b", "gemma-2-2b", "gemma-2-9b", "gemma-2-27b",
                 "phi-3-mini", "phi-3-medium", "gpt3-175b"):
        assert need in names


def test_names_and_aliases_unique():
    seen = {}
    for m in MODELS:
        for key in (m.name, m.hf_id, *m.aliases):
            if not key:
                continue
            k = key.lower()
            assert k not in seen or seen[k] is m, f"{key} names two models"
            seen[k] = m


@pytest.mark.parametrize("spec", MODELS, ids=lambda m: m.name)
def test_entry_has_source_and_resolves_by_hf_id(spec):
    assert spec.source
    assert get_model(spec.name) is spec
    if spec.hf_id:
        assert get_model(spec.hf_id) is spec
        assert get_model(spec.hf_id.upper()) is spec


@pytest.mark.parametrize("name,total", sorted(PUBLISHED_TOTALS.items()))
def test_published_totals(name, total):
    assert count_params(get_model(name)).total == total


@pytest.mark.parametrize("spec", MODELS, ids=lambda m: m.name)
def test_total_params_equal_hf_model_class(spec):
    """Build the real HF class on the meta device (no memory, no download) and count its parameters."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.for_model(**spec.to_hf_config())
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_params(spec).total


def test_unknown_model_suggests_close_matches():
    with pytest.raises(UnknownModelError, match="llama-2-7b"):
        get_model("llama2-7")


def test_gpu_catalog():
    gpus = list_gpus()
    assert len(gpus) >= 20
    for g in gpus:
        assert isinstance(g.memory_bytes, int) and g.memory_bytes > 10**9
        assert g.bf16_tflops > 0 and g.bandwidth_gbps > 0
        assert g.price_usd_per_hour and g.price_as_of and g.price_source
    for need in ("T4", "L4", "A10G", "RTX-3090", "RTX-4090", "RTX-5090", "RTX-A6000", "L40S", "A100-40GB",
                 "A100-80GB", "H100-PCIe", "H100-SXM", "H200", "B200", "MI300X"):
        assert get_gpu(need).name == need


def test_bare_capacity_is_read_exactly_as_written():
    assert get_gpu("48GB").memory_bytes == 48 * 10**9
    assert get_gpu("24GiB").memory_bytes == 24 * 2**30
    assert get_gpu("80 GB").memory_bytes == 80 * 10**9


def test_unknown_gpu():
    with pytest.raises(UnknownGPUError, match="did you mean"):
        get_gpu("h1000")
