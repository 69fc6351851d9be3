"""The grid of small configurations on which the analytical estimate is checked against the dry run.

Shared by tests/test_agreement.py and scripts/agreement_report.py.  Widths are realistic (h=512-1024) and depth
small (2-3 layers): the fake-tensor trace costs the same per op whatever the tensor size.
"""

from __future__ import annotations

from lora_budget.finetune import make_config
from lora_budget.models import ModelSpec

ARCHS = {
    "llama-gqa": dict(model_type="llama", hidden_size=1024, intermediate_size=2816, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=8000),
    "llama-mha-tied": dict(model_type="llama", hidden_size=768, intermediate_size=2048, num_attention_heads=12,
                           num_key_value_heads=12, vocab_size=6000, tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", hidden_size=1024, intermediate_size=3584, num_attention_heads=8,
                    num_key_value_heads=2, vocab_size=8000),
    "qwen2": dict(model_type="qwen2", hidden_size=896, intermediate_size=2432, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=9000, tie_word_embeddings=True),
    "gemma": dict(model_type="gemma", hidden_size=768, intermediate_size=3072, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=256, vocab_size=8000, tie_word_embeddings=True),
    "gemma2": dict(model_type="gemma2", hidden_size=768, intermediate_size=3072, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=256, vocab_size=8000, tie_word_embeddings=True,
                   extra_config=(("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0),
                                 ("query_pre_attn_scalar", 256))),
    "phi3": dict(model_type="phi3", hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=8000),
    "mixtral": dict(model_type="mixtral", hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                    num_key_value_heads=2, vocab_size=6000, num_local_experts=4, num_experts_per_tok=2),
}

METHOD_OPTIONS = {
    "full": [dict(), dict(gradient_checkpointing=True), dict(optim="adamw_torch"), dict(optim="adamw_8bit"),
             dict(dtype="float32", mixed_precision="bf16"), dict(optim="sgd", batch_size=2),
             dict(gradient_accumulation_steps=2)],
    "lora": [dict(), dict(target_modules="all-linear"), dict(target_modules="all-linear", lora_dropout=0.05),
             dict(lora_rank=32, lora_dropout=0.1, target_modules="q_proj,k_proj,v_proj,o_proj"),
             dict(gradient_checkpointing=True, target_modules="all-linear"),
             dict(mixed_precision="bf16", lora_dropout=0.05, target_modules="all-linear"),
             dict(attn_implementation="eager"), dict(padding=True), dict(seq_len=256, batch_size=3),
             dict(optim="adamw_torch", dtype="float32"), dict(optim="paged_adamw_8bit", lora_rank=16)],
    "qlora": [dict(), dict(bnb_4bit_use_double_quant=False), dict(gradient_checkpointing=False),
              dict(mixed_precision="no", lora_dropout=0.0), dict(bnb_4bit_quant_type="fp4", lora_rank=16),
              dict(target_modules="q_proj,v_proj", optim="adamw_torch_fused")],
}

#: Target names per architecture where peft's names differ (Phi-3 fuses q/k/v and gate/up; Mixtral has no
#: default targets in peft 0.21).
RENAME = {"phi3": {"q_proj,k_proj,v_proj,o_proj": "qkv_proj,o_proj", "q_proj,v_proj": "qkv_proj", None: "qkv_proj"},
          "mixtral": {None: "q_proj,v_proj"}}


def grid():
    """Yield (id, ModelSpec, FinetuneConfig) for every grid point."""
    for arch, fields in ARCHS.items():
      for layers in ((2, 3) if arch in ("llama-gqa", "qwen2") else (2,)):
        spec = ModelSpec(name=f"grid-{arch}", num_hidden_layers=layers, **fields)
        for method, variants in METHOD_OPTIONS.items():
            for i, opts in enumerate(variants):
                opts = dict(opts)
                if method != "full":
                    tm = opts.get("target_modules")
                    if arch in RENAME and tm in RENAME[arch]:
                        opts["target_modules"] = RENAME[arch][tm]
                    if arch in RENAME and tm is None and None in RENAME[arch]:
                        opts["target_modules"] = RENAME[arch][None]
                opts.setdefault("seq_len", 512)
                yield f"{arch}-L{layers}-{method}-{i}", spec, make_config(method, **opts)
