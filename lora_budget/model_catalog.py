"""The built-in offline model catalog: data only.

Each entry copies the architecture fields of the model's published HF ``config.json`` (the ``source``), so that
``lora-budget`` never needs the network.  Parameter counts are not stored: they are derived from these fields by
``lora_budget.params`` and tested against the HF model classes and published totals.
"""

from __future__ import annotations

from .models import ModelSpec


def _hf(repo: str) -> str:
    return f"https://huggingface.co/{repo}/blob/main/config.json"


def _llama(name, hf_id, h, i, L, n_h, n_kv, V, *, tie=False, head_dim=None, aliases=(), source=None, ctx=4096,
           model_type="llama", **kw):
    return ModelSpec(name=name, model_type=model_type, hidden_size=h, intermediate_size=i, num_hidden_layers=L,
                     num_attention_heads=n_h, num_key_value_heads=n_kv, vocab_size=V, head_dim=head_dim,
                     tie_word_embeddings=tie, max_position_embeddings=ctx, hf_id=hf_id,
                     source=source or _hf(hf_id), aliases=tuple(aliases), **kw)


MODELS: tuple[ModelSpec, ...] = (
    # --- LLaMA 1 (the QLoRA paper's models; Meta released no HF config, these are the converted checkpoints) ---
    _llama("llama-7b", "huggyllama/llama-7b", 4096, 11008, 32, 32, 32, 32000, ctx=2048,
           aliases=("llama-1-7b", "decapoda-research/llama-7b-hf"), dtype="float16"),
    _llama("llama-13b", "huggyllama/llama-13b", 5120, 13824, 40, 40, 40, 32000, ctx=2048,
           aliases=("llama-1-13b",), dtype="float16"),
    _llama("llama-33b", "huggyllama/llama-30b", 6656, 17920, 60, 52, 52, 32000, ctx=2048,
           aliases=("llama-30b", "llama-1-33b", "llama-1-30b"), dtype="float16"),
    _llama("llama-65b", "huggyllama/llama-65b", 8192, 22016, 80, 64, 64, 32000, ctx=2048,
           aliases=("llama-1-65b",), dtype="float16"),
    # --- Llama 2 ---
    _llama("llama-2-7b", "meta-llama/Llama-2-7b-hf", 4096, 11008, 32, 32, 32, 32000, dtype="float16",
           aliases=("llama2-7b", "meta-llama/Llama-2-7b-chat-hf")),
    _llama("llama-2-13b", "meta-llama/Llama-2-13b-hf", 5120, 13824, 40, 40, 40, 32000, dtype="float16",
           aliases=("llama2-13b", "meta-llama/Llama-2-13b-chat-hf")),
    _llama("llama-2-70b", "meta-llama/Llama-2-70b-hf", 8192, 28672, 80, 64, 8, 32000, dtype="float16",
           aliases=("llama2-70b", "meta-llama/Llama-2-70b-chat-hf")),
    # --- Llama 3 / 3.1 / 3.2 ---
    _llama("llama-3-8b", "meta-llama/Meta-Llama-3-8B", 4096, 14336, 32, 32, 8, 128256, ctx=8192,
           aliases=("llama3-8b", "meta-llama/Meta-Llama-3-8B-Instruct")),
    _llama("llama-3-70b", "meta-llama/Meta-Llama-3-70B", 8192, 28672, 80, 64, 8, 128256, ctx=8192,
           aliases=("llama3-70b",)),
    _llama("llama-3.1-8b", "meta-llama/Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128256, ctx=131072,
           aliases=("llama3.1-8b", "meta-llama/Meta-Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct")),
    _llama("llama-3.1-70b", "meta-llama/Llama-3.1-70B", 8192, 28672, 80, 64, 8, 128256, ctx=131072,
           aliases=("llama3.1-70b", "meta-llama/Meta-Llama-3.1-70B", "meta-llama/Llama-3.1-70B-Instruct",
                    "llama-3.3-70b", "meta-llama/Llama-3.3-70B-Instruct")),
    _llama("llama-3.1-405b", "meta-llama/Llama-3.1-405B", 16384, 53248, 126, 128, 8, 128256, ctx=131072,
           aliases=("llama3.1-405b", "meta-llama/Meta-Llama-3.1-405B")),
    _llama("llama-3.2-1b", "meta-llama/Llama-3.2-1B", 2048, 8192, 16, 32, 8, 128256, tie=True, head_dim=64,
           ctx=131072, aliases=("llama3.2-1b", "meta-llama/Llama-3.2-1B-Instruct")),
    _llama("llama-3.2-3b", "meta-llama/Llama-3.2-3B", 3072, 8192, 28, 24, 8, 128256, tie=True, head_dim=128,
           ctx=131072, aliases=("llama3.2-3b", "meta-llama/Llama-3.2-3B-Instruct")),
    # --- Mistral / Mixtral ---
    _llama("mistral-7b", "mistralai/Mistral-7B-v0.1", 4096, 14336, 32, 32, 8, 32000, ctx=32768,
           model_type="mistral", aliases=("mistral-7b-v0.1", "mistralai/Mistral-7B-Instruct-v0.1")),
    _llama("mistral-7b-v0.3", "mistralai/Mistral-7B-v0.3", 4096, 14336, 32, 32, 8, 32768, ctx=32768,
           model_type="mistral", aliases=("mistralai/Mistral-7B-Instruct-v0.3",)),
    _llama("mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1", 4096, 14336, 32, 32, 8, 32000, ctx=32768,
           model_type="mixtral", num_local_experts=8, num_experts_per_tok=2,
           aliases=("mixtral", "mistralai/Mixtral-8x7B-Instruct-v0.1")),
    _llama("mixtral-8x22b", "mistralai/Mixtral-8x22B-v0.1", 6144, 16384, 56, 48, 8, 32768, ctx=65536,
           model_type="mixtral", num_local_experts=8, num_experts_per_tok=2),
    # --- Qwen2 / Qwen2.5 ---
    _llama("qwen2-7b", "Qwen/Qwen2-7B", 3584, 18944, 28, 28, 4, 152064, ctx=131072, model_type="qwen2"),
    _llama("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", 896, 4864, 24, 14, 2, 151936, tie=True, ctx=32768,
           model_type="qwen2", aliases=("Qwen/Qwen2.5-0.5B-Instruct",)),
    _llama("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B", 1536, 8960, 28, 12, 2, 151936, tie=True, ctx=131072,
           model_type="qwen2", aliases=("Qwen/Qwen2.5-1.5B-Instruct",)),
    _llama("qwen2.5-3b", "Qwen/Qwen2.5-3B", 2048, 11008, 36, 16, 2, 151936, tie=True, ctx=32768,
           model_type="qwen2", aliases=("Qwen/Qwen2.5-3B-Instruct",)),
    _llama("qwen2.5-7b", "Qwen/Qwen2.5-7B", 3584, 18944, 28, 28, 4, 152064, ctx=131072, model_type="qwen2",
           aliases=("Qwen/Qwen2.5-7B-Instruct",)),
    _llama("qwen2.5-14b", "Qwen/Qwen2.5-14B", 5120, 13824, 48, 40, 8, 152064, ctx=131072, model_type="qwen2",
           aliases=("Qwen/Qwen2.5-14B-Instruct",)),
    _llama("qwen2.5-32b", "Qwen/Qwen2.5-32B", 5120, 27648, 64, 40, 8, 152064, ctx=131072, model_type="qwen2",
           aliases=("Qwen/Qwen2.5-32B-Instruct",)),
    _llama("qwen2.5-72b", "Qwen/Qwen2.5-72B", 8192, 29568, 80, 64, 8, 152064, ctx=131072, model_type="qwen2",
           aliases=("Qwen/Qwen2.5-72B-Instruct",)),
    # --- Gemma / Gemma 2 ---
    _llama("gemma-2b", "google/gemma-2b", 2048, 16384, 18, 8, 1, 256000, tie=True, head_dim=256, ctx=8192,
           model_type="gemma", dtype="bfloat16"),
    _llama("gemma-7b", "google/gemma-7b", 3072, 24576, 28, 16, 16, 256000, tie=True, head_dim=256, ctx=8192,
           model_type="gemma"),
    _llama("gemma-2-2b", "google/gemma-2-2b", 2304, 9216, 26, 8, 4, 256000, tie=True, head_dim=256, ctx=8192,
           model_type="gemma2", dtype="float32",
           extra_config=(("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0),
                         ("query_pre_attn_scalar", 256)), aliases=("gemma2-2b",)),
    _llama("gemma-2-9b", "google/gemma-2-9b", 3584, 14336, 42, 16, 8, 256000, tie=True, head_dim=256, ctx=8192,
           model_type="gemma2", dtype="float32",
           extra_config=(("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0),
                         ("query_pre_attn_scalar", 256)), aliases=("gemma2-9b",)),
    _llama("gemma-2-27b", "google/gemma-2-27b", 4608, 36864, 46, 32, 16, 256000, tie=True, head_dim=128,
           ctx=8192, model_type="gemma2", dtype="float32",
           extra_config=(("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0),
                         ("query_pre_attn_scalar", 144)), aliases=("gemma2-27b",)),
    # --- Phi-3 ---
    _llama("phi-3-mini", "microsoft/Phi-3-mini-4k-instruct", 3072, 8192, 32, 32, 32, 32064, ctx=4096,
           model_type="phi3", aliases=("phi-3-mini-4k", "phi3-mini")),
    _llama("phi-3-medium", "microsoft/Phi-3-medium-4k-instruct", 5120, 17920, 40, 40, 10, 32064, ctx=4096,
           model_type="phi3", aliases=("phi-3-medium-4k", "phi3-medium")),
    # --- GPT-3 175B (the LoRA paper's claim), as a GPT-2-architecture config with the paper's Table 2.1 sizes ---
    ModelSpec(name="gpt3-175b", model_type="gpt2", hidden_size=12288, intermediate_size=49152,
              num_hidden_layers=96, num_attention_heads=96, num_key_value_heads=96, vocab_size=50257,
              tie_word_embeddings=True, max_position_embeddings=2048, dtype="float16",
              hf_id="", aliases=("gpt-3", "gpt3", "gpt-3-175b", "davinci"),
              source="Brown et al. 2020, 'Language Models are Few-Shot Learners', Table 2.1 (n_layers 96, "
                     "d_model 12288, n_heads 96, n_ctx 2048; GPT-2 BPE vocabulary of 50257)"),
)
