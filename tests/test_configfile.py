"""Users' own config files (lora_budget.configfile): peft adapter_config.json, TrainingArguments, BitsAndBytesConfig,
axolotl YAML."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lora_budget.configfile import (ASSUMED, NO_EFFECT, NOT_MODELLED, describe_ignored, detect_kind, load_options,
                                    options_from_dict, read_config_file)
from lora_budget.errors import ConfigError, MissingDependencyError
from lora_budget.estimate import estimate
from lora_budget.finetune import make_config
from lora_budget.models import get_model

CONFIGS = Path(__file__).parent / "configs"
AXOLOTL = CONFIGS / "axolotl-llama2-qlora.yml"
ADAPTER = CONFIGS / "adapter_config.json"
TRAINING_ARGS = CONFIGS / "training_args.json"
BNB = CONFIGS / "bnb_config.json"

#: The make_config options each example file stands for (written by hand from the files).
AXOLOTL_OPTIONS = dict(lora_rank=32, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", seq_len=4096,
                       batch_size=2, gradient_accumulation_steps=4, optim="paged_adamw_32bit",
                       gradient_checkpointing=True, attn_implementation="flash_attention_2", dtype="bfloat16",
                       mixed_precision="bf16", padding=False)
PAIR_OPTIONS = dict(lora_rank=16, lora_alpha=32, lora_dropout=0.05,
                    target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), batch_size=4,
                    gradient_accumulation_steps=4, mixed_precision="bf16", optim="adamw_torch_fused",
                    gradient_checkpointing=True, seq_len=1024, padding=False)
BNB_OPTIONS = dict(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype="bfloat16")

#: Fields each reader maps to an option (or to the method / model).  Every other non-empty field of a file must
#: come back as a FieldNote: nothing is dropped silently.
MAPPED = {
    "axolotl": {"base_model", "adapter", "load_in_4bit", "load_in_8bit", "lora_r", "lora_alpha", "lora_dropout",
                "lora_target_modules", "lora_target_linear", "sequence_len", "micro_batch_size",
                "gradient_accumulation_steps", "gradient_checkpointing", "optimizer", "flash_attention",
                "sdp_attention", "eager_attention", "bf16", "fp16", "sample_packing", "pad_to_sequence_len",
                "strict"},
    "peft": {"r", "lora_alpha", "lora_dropout", "target_modules", "base_model_name_or_path", "bias",
             "init_lora_weights"},
    "training_args": {"per_device_train_batch_size", "gradient_accumulation_steps", "bf16", "fp16", "optim",
                      "gradient_checkpointing", "max_length", "max_seq_length", "packing"},
    "bnb": {"load_in_4bit", "load_in_8bit", "_load_in_4bit", "_load_in_8bit", "bnb_4bit_quant_type",
            "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype"},
}


def test_axolotl_qlora_yaml():
    method, options, ignored, model = load_options(AXOLOTL)
    assert method == "qlora"
    assert options == AXOLOTL_OPTIONS
    assert model == "meta-llama/Llama-2-7b-hf"
    assert any(n.field == "bf16" and n.kind == ASSUMED for n in ignored)


def test_axolotl_yaml_gives_the_same_estimate_as_make_config():
    fo = load_options(AXOLOTL)
    spec = get_model(fo.model_name)
    assert spec.name == "llama-2-7b"
    got = estimate(spec, make_config(fo.method, **fo.options)).as_dict()
    want = estimate(get_model("llama-2-7b"), make_config("qlora", **AXOLOTL_OPTIONS)).as_dict()
    assert got == want


def test_adapter_config_and_training_args_merge():
    method, options, ignored, model = load_options(ADAPTER, TRAINING_ARGS)
    assert method == "lora"
    assert options == PAIR_OPTIONS
    assert model == "meta-llama/Llama-2-7b-hf"


def test_adapter_config_and_training_args_give_the_same_estimate_as_make_config():
    fo = load_options([ADAPTER, TRAINING_ARGS])
    got = estimate(get_model(fo.model_name), make_config(fo.method, **fo.options)).as_dict()
    want = estimate(get_model("llama-2-7b"), make_config("lora", **PAIR_OPTIONS)).as_dict()
    assert got == want


def test_files_through_pop_config_as_the_cli_patch_will_call_it():
    """cli.pop_config(kwargs, file_options) with nothing on the command line gives make_config(file options)."""
    from lora_budget.cli import FINETUNE_KEYS, pop_config

    fo = load_options(AXOLOTL)
    kwargs = {"method": "lora", **{k: None for k in FINETUNE_KEYS}}
    cfg = pop_config(kwargs, {**fo.options, "method": fo.method})
    assert cfg == make_config("qlora", **AXOLOTL_OPTIONS)


def test_bnb_config():
    method, options, ignored, model = load_options(BNB)
    assert (method, options, model) == ("qlora", BNB_OPTIONS, None)


def test_adapter_plus_bnb_is_qlora():
    method, options, ignored, _ = load_options(ADAPTER, BNB)
    assert method == "qlora"
    assert options == {**{k: PAIR_OPTIONS[k] for k in ("lora_rank", "lora_alpha", "lora_dropout",
                                                       "target_modules")}, **BNB_OPTIONS}
    assert not any(n.field == "peft_type" and n.kind == ASSUMED for n in ignored)
    make_config(method, **options)


@pytest.mark.parametrize("path", [AXOLOTL, ADAPTER, TRAINING_ARGS, BNB])
def test_nothing_is_dropped_silently(path):
    data = read_config_file(path)
    kind = detect_kind(data, str(path))
    fo = options_from_dict(data, str(path))
    noted = {n.field for n in fo.ignored}
    for key, value in data.items():
        if value in (None, False, "", [], {}) or key in MAPPED[kind]:
            continue
        assert key in noted, f"{path.name}: {key} neither mapped nor reported"
    assert describe_ignored(fo.ignored)


@pytest.mark.parametrize("path, kind", [(AXOLOTL, "axolotl"), (ADAPTER, "peft"), (TRAINING_ARGS, "training_args"),
                                        (BNB, "bnb")])
def test_detect_kind_by_content(path, kind, tmp_path):
    assert detect_kind(read_config_file(path)) == kind
    renamed = tmp_path / "whatever.txt"  # the kind comes from the content, not the name
    renamed.write_text(path.read_text())
    assert detect_kind(read_config_file(renamed)) == kind


def test_memory_relevant_fields_are_reported_as_not_modelled():
    data = json.loads(ADAPTER.read_text())
    data.update(modules_to_save=["embed_tokens", "lm_head"], use_dora=True, bias="all")
    fo = options_from_dict(data, "adapter_config.json")
    kinds = {n.field: n.kind for n in fo.ignored}
    assert kinds["modules_to_save"] == kinds["use_dora"] == kinds["bias"] == NOT_MODELLED
    assert any("trainable copies" in n.reason for n in fo.ignored if n.field == "modules_to_save")
    ta = json.loads(TRAINING_ARGS.read_text())
    ta.update(deepspeed="ds_zero3.json")
    notes = {n.field: n for n in options_from_dict(ta, "training_args.json").ignored}
    assert notes["deepspeed"].kind == NOT_MODELLED and "one GPU" in notes["deepspeed"].reason
    assert notes["learning_rate"].kind == NO_EFFECT


def test_axolotl_full_fine_tune_and_float32_default():
    fo = options_from_dict({"base_model": "meta-llama/Llama-2-7b-hf", "sequence_len": 2048, "micro_batch_size": 1,
                            "lora_r": 8, "optimizer": "adamw_torch_fused"}, "full.yml")
    assert fo.method == "full"
    assert fo.options == {"seq_len": 2048, "batch_size": 1, "optim": "adamw_torch_fused", "dtype": "float32",
                          "mixed_precision": "no"}
    assert any(n.field == "lora_r" and n.kind == NO_EFFECT for n in fo.ignored)
    assert any(n.field == "bf16" and n.kind == ASSUMED and "float32" in n.reason for n in fo.ignored)
    make_config(fo.method, **fo.options)


def test_axolotl_offloaded_checkpointing_is_reported():
    fo = options_from_dict({"adapter": "lora", "gradient_checkpointing": "offload", "bf16": True}, "x.yml")
    assert fo.options["gradient_checkpointing"] is True
    assert any(n.field == "gradient_checkpointing" and n.kind == NOT_MODELLED for n in fo.ignored)


def test_axolotl_batch_size_gives_accumulation():
    fo = options_from_dict({"adapter": "lora", "micro_batch_size": 2, "batch_size": 16, "bf16": True}, "x.yml")
    assert fo.options["gradient_accumulation_steps"] == 8


def test_folder_with_adapter_config(tmp_path):
    (tmp_path / "adapter_config.json").write_text(ADAPTER.read_text())
    assert load_options(tmp_path).options["lora_rank"] == 16


# ---- errors name the file and the field -------------------------------------------------------------------------
def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_malformed_json(tmp_path):
    p = write(tmp_path, "adapter_config.json", '{"r": 16,\n "lora_alpha": }')
    with pytest.raises(ConfigError) as e:
        load_options(p)
    assert str(p) in str(e.value) and "line 2" in str(e.value)


def test_malformed_yaml(tmp_path):
    p = write(tmp_path, "ax.yml", "adapter: qlora\nlora_r: [1, 2\n")
    with pytest.raises(ConfigError) as e:
        load_options(p)
    assert str(p) in str(e.value) and "YAML" in str(e.value)


@pytest.mark.parametrize("data, field", [
    ({"peft_type": "LORA", "r": "sixteen", "lora_alpha": 16, "target_modules": ["q_proj"]}, "'r'"),
    ({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ".*proj"}, "'target_modules'"),
    ({"peft_type": "LORA", "r": 8, "lora_dropout": 1.5, "target_modules": ["q_proj"]}, "'lora_dropout'"),
    ({"per_device_train_batch_size": 0}, "'per_device_train_batch_size'"),
    ({"per_device_train_batch_size": 2, "optim": "adafactor"}, "'optim'"),
    ({"bf16": True, "fp16": True, "output_dir": "x"}, "'bf16' and 'fp16'"),
    ({"max_length": 1024, "max_seq_length": 2048, "output_dir": "x"}, "'max_length'"),
    ({"load_in_4bit": True, "bnb_4bit_quant_type": "int4"}, "'bnb_4bit_quant_type'"),
    ({"load_in_8bit": True, "llm_int8_threshold": 6.0}, "'load_in_8bit'"),
    ({"peft_type": "IA3", "target_modules": ["q_proj"]}, "'peft_type'"),
    ({"adapter": "qlora", "optimizer": "lion_8bit"}, "'optimizer'"),
    ({"adapter": "ia3", "lora_r": 8}, "'adapter'"),
    ({"base_model": "x", "load_in_4bit": True}, "'load_in_4bit'"),
    ({"adapter": "lora", "micro_batch_size": "two"}, "'micro_batch_size'"),
])
def test_bad_fields_name_file_and_field(tmp_path, data, field):
    p = write(tmp_path, "cfg.json", json.dumps(data))
    with pytest.raises(ConfigError) as e:
        load_options(p)
    msg = str(e.value)
    assert str(p) in msg and field in msg and "\n" not in msg


def test_unknown_kind_and_model_config(tmp_path):
    p = write(tmp_path, "what.json", json.dumps({"foo": 1}))
    with pytest.raises(ConfigError, match="cannot tell what kind"):
        load_options(p)
    m = write(tmp_path, "config.json", json.dumps({"model_type": "llama", "hidden_size": 4096}))
    with pytest.raises(ConfigError, match="MODEL argument"):
        load_options(m)
    lst = write(tmp_path, "list.json", "[1, 2]")
    with pytest.raises(ConfigError, match="mapping"):
        load_options(lst)
    with pytest.raises(ConfigError, match="no such file"):
        load_options(tmp_path / "missing.json")


def test_contradicting_files(tmp_path):
    other = json.loads(ADAPTER.read_text())
    other["r"] = 64
    p = write(tmp_path, "other_adapter.json", json.dumps(other))
    with pytest.raises(ConfigError) as e:
        load_options(ADAPTER, p)
    assert str(ADAPTER) in str(e.value) and str(p) in str(e.value) and "lora_rank" in str(e.value)
    full = write(tmp_path, "full.yml", "base_model: meta-llama/Llama-2-7b-hf\nmicro_batch_size: 1\nbf16: true\n")
    with pytest.raises(ConfigError, match="method"):
        load_options(full, ADAPTER)


def test_yaml_without_pyyaml(monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(MissingDependencyError, match=r"lora_budget\[yaml\]"):
        load_options(AXOLOTL)
    load_options(ADAPTER)  # JSON needs no PyYAML
