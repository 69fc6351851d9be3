"""Shared fixtures.  No test touches the network; heavy extras are skipped when not installed."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def tiny_llama():
    from lora_budget.models import ModelSpec

    return ModelSpec(name="tiny-llama", model_type="llama", hidden_size=256, intermediate_size=688,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
