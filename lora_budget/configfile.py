"""Read the config files people already have into FinetuneConfig options.  Standard library; YAML through PyYAML,
imported only when a YAML file is read (the ``yaml`` extra).

Kinds, recognised by their content (not their file name):

- a peft ``adapter_config.json`` (``LoraConfig.save_pretrained``): r, lora_alpha, lora_dropout, target_modules,
  base_model_name_or_path.  It does not say whether the base model was 4-bit: method lora unless another file
  (a BitsAndBytesConfig, an axolotl ``load_in_4bit``) says so;
- HF ``TrainingArguments`` (or TRL ``SFTConfig``) as JSON (``training_args.to_json_string()``) or YAML:
  per_device_train_batch_size, gradient_accumulation_steps, bf16 / fp16, optim, gradient_checkpointing,
  max_seq_length / max_length, packing, model_init_kwargs (dtype, attn_implementation).  No method;
- a ``BitsAndBytesConfig`` dict (``to_dict()``, the same as the ``quantization_config`` of a quantised model):
  load_in_4bit -> method qlora, bnb_4bit_quant_type, bnb_4bit_use_double_quant, bnb_4bit_compute_dtype;
- an axolotl YAML: base_model, adapter (lora | qlora; none = full fine-tuning), load_in_4bit, lora_r, lora_alpha,
  lora_dropout, lora_target_modules / lora_target_linear, sequence_len, micro_batch_size,
  gradient_accumulation_steps (or batch_size), gradient_checkpointing, optimizer, flash_attention /
  sdp_attention / eager_attention, bf16 / fp16 (axolotl loads the model in that dtype *and* autocasts; with
  neither it loads float32: ``normalize_config``), sample_packing / pad_to_sequence_len.

Several files merge (e.g. adapter_config.json + training_args.json); two files giving different values for one
option is an error.  Every field the estimator does not use is reported (``FieldNote``), split into fields with
no effect on memory and fields that may change memory but are not modelled; values read with an assumption are
reported too.  Nothing is dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .errors import ConfigError, MissingDependencyError
from .finetune import ATTN_IMPLEMENTATIONS, METHODS, OPTIMS, QUANT_TYPES
from .units import normalise_dtype

#: FieldNote kinds.
NO_EFFECT = "no effect on memory"
NOT_MODELLED = "not modelled"
ASSUMED = "read with an assumption"


@dataclass(frozen=True)
class FieldNote:
    """A field of a config file that the estimator ignores (``kind`` NO_EFFECT or NOT_MODELLED) or reads with an
    assumption (ASSUMED), with the reason."""

    file: str
    field: str
    value: object
    kind: str
    reason: str = ""

    def __str__(self) -> str:
        value = repr(self.value)
        if len(value) > 40:
            value = value[:37] + "..."
        why = f": {self.reason}" if self.reason else ""
        return f"{self.file}: {self.field}={value} ({self.kind}{why})"


class FileOptions(NamedTuple):
    """What config files say: ``method`` (None when they do not say), ``options`` (FinetuneConfig option names),
    ``ignored`` (FieldNote list: ignored fields and assumptions) and ``model_name`` (None when no file names one)."""

    method: str | None
    options: dict
    ignored: list
    model_name: str | None


# ---------------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------------
def _yaml():
    try:
        import yaml  # type: ignore
    except ImportError:
        raise MissingDependencyError("reading YAML config files needs PyYAML: pip install 'lora_budget[yaml]'") \
            from None
    return yaml


def read_config_file(path) -> dict:
    """The top-level mapping of a JSON or YAML file (a folder: its adapter_config.json).

    Raises:
        ConfigError: missing, unreadable or malformed file, or not a mapping at the top level.
        MissingDependencyError: a YAML file without PyYAML installed.
    """
    p = Path(path)
    if p.is_dir():
        if not (p / "adapter_config.json").is_file():
            raise ConfigError(f"{path}: a folder without adapter_config.json")
        p = p / "adapter_config.json"
    if not p.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read it ({exc})") from None
    as_yaml = p.suffix.lower() in (".yaml", ".yml") or (p.suffix.lower() != ".json"
                                                         and not text.lstrip().startswith("{"))
    if as_yaml:
        yaml = _yaml()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p} is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of fields at the top level, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------------------------
# Kinds
# ---------------------------------------------------------------------------------------------------------------
_AXOLOTL_MARKERS = {"base_model", "adapter", "micro_batch_size", "sequence_len", "lora_r", "lora_target_linear",
                    "lora_target_modules", "num_epochs", "sample_packing"}
_BNB_MARKERS = {"bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant", "llm_int8_threshold",
                "_load_in_4bit", "_load_in_8bit", "bnb_4bit_quant_storage"}
_TA_MARKERS = {"per_device_train_batch_size", "gradient_accumulation_steps", "output_dir", "optim", "learning_rate",
               "num_train_epochs", "max_steps", "bf16", "fp16", "gradient_checkpointing", "max_seq_length",
               "max_length", "logging_steps", "lr_scheduler_type", "warmup_ratio", "per_device_eval_batch_size"}
KINDS = ("peft", "axolotl", "bnb", "training_args")


def detect_kind(data: dict, path: str = "(dict)") -> str:
    """"peft", "axolotl", "bnb" or "training_args", from the fields of a config mapping.

    Raises:
        ConfigError: none of them (the message names the file and what was expected).
    """
    keys = set(data)
    if "peft_type" in data or {"r", "lora_alpha", "target_modules"} <= keys:
        return "peft"
    if keys & _AXOLOTL_MARKERS:
        return "axolotl"
    if keys & _BNB_MARKERS or data.get("quant_method") == "bitsandbytes" or (
            "load_in_4bit" in keys and not keys & _TA_MARKERS):
        return "bnb"
    if keys & _TA_MARKERS:
        return "training_args"
    if "model_type" in keys and "hidden_size" in keys:
        raise ConfigError(f"{path} is a model config.json: give it as the MODEL argument, not as a training config")
    raise ConfigError(f"{path}: cannot tell what kind of config this is (expected a peft adapter_config.json, HF "
                      f"TrainingArguments JSON/YAML, a BitsAndBytesConfig or an axolotl YAML); fields: "
                      f"{', '.join(sorted(map(str, keys))[:8]) or 'none'}")


# ---------------------------------------------------------------------------------------------------------------
# Field readers
# ---------------------------------------------------------------------------------------------------------------
class _Reader:
    """Reads the fields of one file into options, noting what it ignores or assumes."""

    def __init__(self, path: str, data: dict, kind: str):
        self.path, self.data, self.kind = path, data, kind
        self.options: dict = {}
        self.notes: list[FieldNote] = []
        self.method: str | None = None
        self.model_name: str | None = None
        self.handled: set[str] = set()

    def bad(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: field {key!r} {problem}, got {self.data.get(key)!r}")

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def get(self, key: str):
        self.handled.add(key)
        return self.data.get(key)

    def int_(self, key: str) -> int | None:
        v = self.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise self.bad(key, "must be a positive integer")
        return v

    def float_(self, key: str, lo: float = 0.0, hi: float | None = None) -> float | None:
        v = self.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < lo or (hi is not None and v >= hi):
            raise self.bad(key, f"must be a number in [{lo}, {hi})" if hi is not None else f"must be a number >= {lo}")
        return int(v) if float(v).is_integer() and key.endswith("alpha") else float(v)

    def bool_(self, key: str, allow: tuple = ()) -> bool | str | None:
        v = self.get(key)
        if v is None or v in allow:
            return v
        if not isinstance(v, bool):
            raise self.bad(key, "must be true or false")
        return v

    def dtype(self, key: str, value=None) -> str | None:
        v = self.get(key) if value is None else value
        if v is None:
            return None
        try:
            return normalise_dtype(str(v))
        except ConfigError:
            raise self.bad(key, "must be bfloat16, float16 or float32") from None

    def choice(self, key: str, choices: tuple, what: str) -> str | None:
        v = self.get(key)
        if v is None:
            return None
        if v not in choices:
            raise ConfigError(f"{self.path}: field {key!r} = {v!r} is not a {what} lora_budget models; use one of: "
                              f"{', '.join(choices)}")
        return v

    def targets(self, key: str, value=None):
        v = self.get(key) if value is None else value
        if v is None:
            return None
        if isinstance(v, str):
            if v.strip().lower() in ("all-linear", "all_linear"):
                return "all-linear"
            raise self.bad(key, "as a string must be 'all-linear' (peft regexes are not modelled: list the names)")
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) and x for x in v):
            raise self.bad(key, "must be a list of module names")
        return tuple(sorted(set(v), key=list(v).index)) or None

    def set(self, option: str, value) -> None:
        if value is not None:
            self.options[option] = value

    def note(self, key: str, kind: str, reason: str = "", value=None) -> None:
        self.handled.add(key)
        self.notes.append(FieldNote(self.path, key, self.data.get(key) if value is None else value, kind, reason))

    def rest(self, no_effect: set[str], reasons: dict[str, str], defaults: dict | None = None) -> None:
        """Note every field not read: NO_EFFECT when known harmless, NOT_MODELLED otherwise.  Unset values (None,
        false, empty) and values equal to the library default (``defaults``) are not fields that do anything."""
        defaults = defaults or {}
        for key, value in self.data.items():
            if key in self.handled:
                continue
            if value is None or value is False or value == "" or value == [] or value == {}:
                continue
            if key in defaults and value == defaults[key]:
                continue
            if key in no_effect or any(key.startswith(p) for p in _NO_EFFECT_PREFIXES):
                self.notes.append(FieldNote(self.path, key, value, NO_EFFECT))
            else:
                self.notes.append(FieldNote(self.path, key, value, NOT_MODELLED, reasons.get(key, "")))


_NO_EFFECT_PREFIXES = ("wandb_", "mlflow_", "hub_", "logging_", "save_", "eval_", "push_to_hub", "report_",
                       "dataloader_", "ddp_", "log_", "comet_", "swanlab_")


# ---- peft ---------------------------------------------------------------------------------------------------------
_PEFT_NO_EFFECT = {"task_type", "peft_type", "auto_mapping", "revision", "inference_mode", "fan_in_fan_out",
                   "init_lora_weights", "use_rslora", "megatron_config", "megatron_core", "layers_pattern",
                   "alpha_pattern", "peft_version", "base_model_class", "parent_library"}
_PEFT_DEFAULTS = {"bias": "none", "init_lora_weights": True}
_PEFT_REASONS = {
    "modules_to_save": "these modules become fully trainable copies (weights, gradients and optimizer state)",
    "bias": "trainable biases are not counted",
    "use_dora": "DoRA's magnitude vectors and extra activations are not counted",
    "layers_to_transform": "the estimate adapts every layer",
    "rank_pattern": "the estimate uses r for every module",
    "layer_replication": "replicated layers are not counted",
    "lora_bias": "trainable lora_B biases are not counted",
    "exclude_modules": "the estimate adapts every target module",
    "trainable_token_indices": "trainable token embeddings are not counted",
    "target_parameters": "adapted nn.Parameters are not counted",
}


def _read_peft(r: _Reader) -> None:
    peft_type = r.get("peft_type")
    if peft_type is not None and str(peft_type).upper() != "LORA":
        raise ConfigError(f"{r.path}: field 'peft_type' = {peft_type!r}: only LORA adapters are modelled")
    r.method = "lora"
    r.set("lora_rank", r.int_("r"))
    r.set("lora_alpha", r.float_("lora_alpha", lo=1e-12))
    r.set("lora_dropout", r.float_("lora_dropout", hi=1.0))
    r.set("target_modules", r.targets("target_modules"))
    name = r.get("base_model_name_or_path")
    if name is not None and not isinstance(name, str):
        raise r.bad("base_model_name_or_path", "must be a model name or path")
    r.model_name = name or None
    r.notes.append(FieldNote(r.path, "peft_type", peft_type or "LORA", ASSUMED,
                             "an adapter_config.json does not say whether the base was 4-bit: method lora unless "
                             "another file says load_in_4bit"))
    r.rest(_PEFT_NO_EFFECT, _PEFT_REASONS, _PEFT_DEFAULTS)


# ---- BitsAndBytesConfig -----------------------------------------------------------------------------------------
_BNB_NO_EFFECT = {"quant_method", "llm_int8_threshold", "llm_int8_has_fp16_weight", "bnb_4bit_quant_storage",
                  "_load_in_4bit", "_load_in_8bit"}
_BNB_REASONS = {"llm_int8_skip_modules": "the estimate quantises every decoder Linear",
                "llm_int8_enable_fp32_cpu_offload": "CPU offload is not modelled"}


def _read_bnb(r: _Reader) -> None:
    four = r.bool_("load_in_4bit")
    if four is None:
        four = r.bool_("_load_in_4bit")
    eight = r.bool_("load_in_8bit")
    if eight is None:
        eight = r.bool_("_load_in_8bit")
    r.handled.update({"load_in_4bit", "_load_in_4bit", "load_in_8bit", "_load_in_8bit"})
    if eight:
        raise ConfigError(f"{r.path}: field 'load_in_8bit' is true: an 8-bit base model is not modelled (use "
                          f"load_in_4bit for QLoRA)")
    if not four:
        raise ConfigError(f"{r.path}: field 'load_in_4bit' is not true: a BitsAndBytesConfig without 4-bit loading "
                          f"quantises nothing that lora_budget models")
    r.method = "qlora"
    r.set("bnb_4bit_quant_type", r.choice("bnb_4bit_quant_type", QUANT_TYPES, "4-bit quant type"))
    r.set("bnb_4bit_use_double_quant", r.bool_("bnb_4bit_use_double_quant"))
    r.set("bnb_4bit_compute_dtype", r.dtype("bnb_4bit_compute_dtype"))
    r.rest(_BNB_NO_EFFECT, _BNB_REASONS)


# ---- TrainingArguments / SFTConfig ------------------------------------------------------------------------------
_TA_NO_EFFECT = set("""
    output_dir overwrite_output_dir do_train do_eval do_predict eval_strategy evaluation_strategy prediction_loss_only
    per_device_eval_batch_size per_gpu_eval_batch_size eval_accumulation_steps eval_delay learning_rate weight_decay
    adam_beta1 adam_beta2 adam_epsilon max_grad_norm num_train_epochs max_steps lr_scheduler_type lr_scheduler_kwargs
    warmup_ratio warmup_steps seed data_seed run_name disable_tqdm remove_unused_columns label_names
    load_best_model_at_end metric_for_best_model greater_is_better resume_from_checkpoint ignore_data_skip
    group_by_length length_column_name local_rank tf32 full_determinism past_index optim_args
    neftune_noise_alpha dataset_text_field dataset_num_proc completion_only_loss assistant_only_loss
    average_tokens_across_devices accelerator_config restore_callback_states_from_checkpoint skip_memory_metrics
    batch_eval_metrics jit_mode_eval use_ipex fp16_opt_level half_precision_backend bf16_full_eval fp16_full_eval
    label_smoothing_factor debug dispatch_batches split_batches include_inputs_for_metrics include_for_metrics
    include_num_input_tokens_seen include_tokens_per_second use_cpu no_cuda use_mps_device torchdynamo
    ray_scope dataset_kwargs eval_packing dataset_batch_size chat_template_path mp_parameters tpu_num_cores
    tpu_metrics_debug
    hub_always_push project trackio_space_id
    """.split())
_TA_REASONS = {
    "deepspeed": "ZeRO sharding / offload: the estimate is for one GPU holding everything",
    "fsdp": "FSDP sharding: the estimate is for one GPU holding everything",
    "fsdp_config": "FSDP sharding: the estimate is for one GPU holding everything",
    "auto_find_batch_size": "the batch size may be lowered at run time",
    "torch_compile": "compiled graphs change activation memory",
    "use_liger_kernel": "Liger kernels (fused cross-entropy) change the logits memory",
    "gradient_checkpointing_kwargs": "estimated as plain gradient checkpointing",
    "padding_free": "",
    "per_gpu_train_batch_size": "deprecated; per_device_train_batch_size is used",
}


def _read_training_args(r: _Reader) -> None:
    r.set("batch_size", r.int_("per_device_train_batch_size"))
    r.set("gradient_accumulation_steps", r.int_("gradient_accumulation_steps"))
    bf16 = r.bool_("bf16")
    fp16 = r.bool_("fp16")
    if bf16 and fp16:
        raise ConfigError(f"{r.path}: fields 'bf16' and 'fp16' are both true")
    if bf16:
        r.set("mixed_precision", "bf16")
    elif fp16:
        r.set("mixed_precision", "fp16")
    elif bf16 is False or fp16 is False:
        r.set("mixed_precision", "no")
    r.set("optim", r.choice("optim", OPTIMS, "HF optim"))
    r.set("gradient_checkpointing", r.bool_("gradient_checkpointing"))
    seq = {k: r.int_(k) for k in ("max_length", "max_seq_length") if r.has(k)}
    if len(set(seq.values())) > 1:
        raise ConfigError(f"{r.path}: fields 'max_length' ({seq['max_length']}) and 'max_seq_length' "
                          f"({seq['max_seq_length']}) disagree")
    if seq:
        r.set("seq_len", next(iter(seq.values())))
    packing = r.bool_("packing")
    padding_free = r.bool_("padding_free")
    if packing or padding_free:
        r.set("padding", False)
    elif packing is False and r.options.get("batch_size", 1) > 1:
        r.note("packing", ASSUMED, "unpacked batches of unequal length are padded with a mask: the estimate "
                                   "assumes none; add --padding for that worst case")
    mik = r.get("model_init_kwargs")
    if mik is not None:
        if not isinstance(mik, dict):
            raise r.bad("model_init_kwargs", "must be a mapping")
        for k, v in mik.items():
            if k in ("dtype", "torch_dtype") and v not in (None, "auto"):
                r.set("dtype", r.dtype(f"model_init_kwargs.{k}", v))
            elif k == "attn_implementation" and v is not None:
                if v not in ATTN_IMPLEMENTATIONS:
                    raise ConfigError(f"{r.path}: field 'model_init_kwargs.attn_implementation' = {v!r} is not one "
                                      f"of {', '.join(ATTN_IMPLEMENTATIONS)}")
                r.set("attn_implementation", v)
            elif v not in (None, False, "", [], {}):
                kind = NO_EFFECT if k in ("trust_remote_code", "revision", "use_cache", "device_map") else NOT_MODELLED
                r.notes.append(FieldNote(r.path, f"model_init_kwargs.{k}", v, kind))
    r.rest(_TA_NO_EFFECT, _TA_REASONS)


# ---- axolotl ----------------------------------------------------------------------------------------------------
_AXOLOTL_NO_EFFECT = set("""
    model_type tokenizer_type tokenizer_config tokenizer_use_fast tokenizer_legacy is_llama_derived_model
    is_mistral_derived_model is_qwen_derived_model is_falcon_derived_model trust_remote_code strict datasets
    test_datasets dataset_prepared_path val_set_size output_dir lora_model_dir num_epochs max_steps lr_scheduler
    learning_rate warmup_steps warmup_ratio cosine_min_lr_ratio train_on_inputs group_by_length tf32
    early_stopping_patience resume_from_checkpoint auto_resume_from_checkpoints local_rank evals_per_epoch
    saves_per_epoch debug weight_decay special_tokens tokens chat_template default_system_message seed
    dataset_processes shuffle_merged_datasets max_grad_norm adam_beta1 adam_beta2 adam_epsilon lora_fan_in_fan_out
    base_model_config hf_use_auth_token remove_unused_columns low_cpu_mem_usage noisy_embedding_alpha
    neftune_noise_alpha dataset_exact_deduplication eval_sample_packing eval_batch_size lr_quadratic_warmup
    loss_watchdog_threshold loss_watchdog_patience gpu_memory_limit use_tensorboard chat_template_jinja
    """.split())
_AXOLOTL_REASONS = {
    "deepspeed": "ZeRO sharding / offload: the estimate is for one GPU holding everything",
    "fsdp": "FSDP sharding: the estimate is for one GPU holding everything",
    "fsdp_config": "FSDP sharding: the estimate is for one GPU holding everything",
    "lora_modules_to_save": "these modules become fully trainable copies (weights, gradients and optimizer state)",
    "peft_use_dora": "DoRA is not modelled",
    "xformers_attention": "estimated as SDPA",
    "s2_attention": "shifted-sparse attention is not modelled",
    "torch_compile": "compiled graphs change activation memory",
    "gradient_checkpointing_kwargs": "estimated as plain gradient checkpointing",
    "plugins": "plugins (e.g. Liger, cut cross-entropy) change memory",
    "gptq": "GPTQ bases are not modelled",
}


def _read_axolotl(r: _Reader) -> None:
    name = r.get("base_model")
    if name is not None and not isinstance(name, str):
        raise r.bad("base_model", "must be a model name or path")
    r.model_name = name or None
    adapter = r.get("adapter")
    if adapter not in (None, "", "lora", "qlora"):
        raise ConfigError(f"{r.path}: field 'adapter' = {adapter!r}: only lora and qlora adapters (or none, full "
                          f"fine-tuning) are modelled")
    four = r.bool_("load_in_4bit")
    if r.bool_("load_in_8bit"):
        raise ConfigError(f"{r.path}: field 'load_in_8bit' is true: an 8-bit base model is not modelled")
    if adapter == "qlora" or (adapter == "lora" and four):
        r.method = "qlora"
        if adapter == "lora":
            r.note("load_in_4bit", ASSUMED, "adapter lora on a 4-bit base read as qlora")
    elif adapter == "lora":
        r.method = "lora"
    else:
        if four:
            raise ConfigError(f"{r.path}: field 'load_in_4bit' is true without an adapter: full fine-tuning of a "
                              f"4-bit model is not possible (set adapter: qlora)")
        r.method = "full"
    lora_keys = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear")
    if r.method == "full":
        for k in lora_keys:
            if r.data.get(k) not in (None, False, [], ""):
                r.note(k, NO_EFFECT, "no adapter: full fine-tuning")
    else:
        r.set("lora_rank", r.int_("lora_r"))
        r.set("lora_alpha", r.float_("lora_alpha", lo=1e-12))
        r.set("lora_dropout", r.float_("lora_dropout", hi=1.0))
        linear = r.bool_("lora_target_linear")
        mods = r.targets("lora_target_modules")
        if linear:
            r.set("target_modules", "all-linear")  # axolotl adds every Linear name but lm_head: peft's all-linear
        elif mods:
            r.set("target_modules", mods)
    if r.method == "qlora":
        bck = r.get("bnb_config_kwargs")
        if bck is not None:
            if not isinstance(bck, dict):
                raise r.bad("bnb_config_kwargs", "must be a mapping")
            for k, v in bck.items():
                if k == "bnb_4bit_quant_type":
                    if v not in QUANT_TYPES:
                        raise ConfigError(f"{r.path}: field 'bnb_config_kwargs.bnb_4bit_quant_type' = {v!r} is not "
                                          f"nf4 or fp4")
                    r.set("bnb_4bit_quant_type", v)
                elif k == "bnb_4bit_use_double_quant":
                    if not isinstance(v, bool):
                        raise ConfigError(f"{r.path}: field 'bnb_config_kwargs.{k}' must be true or false")
                    r.set("bnb_4bit_use_double_quant", v)
                elif v not in (None, False, "", [], {}):
                    r.notes.append(FieldNote(r.path, f"bnb_config_kwargs.{k}", v, NO_EFFECT))
    r.set("seq_len", r.int_("sequence_len"))
    r.set("batch_size", r.int_("micro_batch_size"))
    ga = r.int_("gradient_accumulation_steps")
    total = r.int_("batch_size")
    if ga is None and total is not None:
        mb = r.options.get("batch_size", 1)
        if total % mb:
            raise ConfigError(f"{r.path}: field 'batch_size' ({total}) is not a multiple of micro_batch_size ({mb})")
        ga = total // mb
    r.set("gradient_accumulation_steps", ga)
    gc = r.get("gradient_checkpointing")
    if gc is not None:
        if isinstance(gc, str):
            r.note("gradient_checkpointing", NOT_MODELLED, f"{gc!r} read as plain gradient checkpointing (offloaded "
                                                            f"checkpoints would need less GPU memory)")
            gc = True
        elif not isinstance(gc, bool):
            raise r.bad("gradient_checkpointing", "must be true, false or a checkpointing mode")
        r.set("gradient_checkpointing", gc)
    r.set("optim", r.choice("optimizer", OPTIMS, "HF optim"))
    attn = [a for k, a in (("flash_attention", "flash_attention_2"), ("sdp_attention", "sdpa"),
                           ("eager_attention", "eager")) if r.bool_(k)]
    if len(attn) > 1:
        raise ConfigError(f"{r.path}: more than one attention is enabled ({', '.join(attn)})")
    if attn:
        r.set("attn_implementation", attn[0])
    bf16 = r.bool_("bf16", allow=("auto", "full"))
    fp16 = r.bool_("fp16")
    pure_bf16 = r.bool_("bfloat16")
    pure_fp16 = r.bool_("float16")
    if bf16 and fp16:
        raise ConfigError(f"{r.path}: fields 'bf16' and 'fp16' are both set")
    if bf16:
        r.set("dtype", "bfloat16")
        r.set("mixed_precision", "no" if bf16 == "full" else "bf16")
        if bf16 == "auto":
            r.note("bf16", ASSUMED, "auto read as bf16 (axolotl enables it on GPUs that support bf16)")
    elif fp16:
        r.set("dtype", "float16")
        r.set("mixed_precision", "fp16")
    elif pure_bf16 or pure_fp16:
        r.set("dtype", "bfloat16" if pure_bf16 else "float16")
        r.set("mixed_precision", "no")
    else:
        r.set("dtype", "float32")
        r.set("mixed_precision", "no")
        r.notes.append(FieldNote(r.path, "bf16", None, ASSUMED, "neither bf16 nor fp16 set: axolotl loads the "
                                                                "model in float32 without autocast"))
    packing = r.bool_("sample_packing")
    pad = r.bool_("pad_to_sequence_len")
    if packing:
        r.set("padding", False)
    elif pad:
        r.set("padding", True)
    r.rest(_AXOLOTL_NO_EFFECT, _AXOLOTL_REASONS)


_READERS = {"peft": _read_peft, "bnb": _read_bnb, "training_args": _read_training_args, "axolotl": _read_axolotl}


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------
def options_from_dict(data: dict, path: str = "(dict)", kind: str | None = None) -> FileOptions:
    """FileOptions of one config mapping (``kind`` detected by ``detect_kind`` when not given)."""
    if kind is None:
        kind = detect_kind(data, path)
    if kind not in _READERS:
        raise ConfigError(f"unknown config kind {kind!r}; use one of: {', '.join(KINDS)}")
    r = _Reader(path, data, kind)
    _READERS[kind](r)
    return FileOptions(r.method, dict(r.options), list(r.notes), r.model_name)


def _merge_method(a: str | None, b: str | None, where: str) -> str | None:
    if a is None or a == b:
        return b if a is None else a
    if b is None:
        return a
    if {a, b} == {"lora", "qlora"}:
        return "qlora"  # LoRA adapters (adapter_config.json) on a 4-bit base (BitsAndBytesConfig)
    raise ConfigError(f"{where}: the files disagree on the method ({a} and {b})")


def load_options(*paths) -> FileOptions:
    """Read and merge config files (peft adapter_config.json, TrainingArguments, BitsAndBytesConfig, axolotl).

    Args:
        paths: one or more file paths (or folders holding an adapter_config.json); a single list also works.

    Returns:
        FileOptions(method, options, ignored, model_name): ``method`` None when no file says; ``options`` with
        FinetuneConfig names (for ``make_config`` / ``cli.pop_config(kwargs, file_options)``); ``ignored`` the
        FieldNotes to show the user; ``model_name`` None when no file names a base model.

    Raises:
        ConfigError: a malformed or unknown file, a bad field (named), or files that contradict each other.
        MissingDependencyError: a YAML file without PyYAML.
    """
    if len(paths) == 1 and isinstance(paths[0], (list, tuple)):
        paths = tuple(paths[0])
    if not paths:
        raise ConfigError("no config file given")
    method: str | None = None
    options: dict = {}
    origin: dict[str, str] = {}
    notes: list[FieldNote] = []
    model_name: str | None = None
    model_from = ""
    for p in paths:
        path = str(p)
        fo = options_from_dict(read_config_file(path), path)
        method = _merge_method(method, fo.method, f"{model_from or path}")
        for k, v in fo.options.items():
            if k in options and options[k] != v:
                raise ConfigError(f"{origin[k]} and {path} disagree on {k} ({options[k]!r} and {v!r})")
            options[k] = v
            origin[k] = path
        if fo.model_name:
            if model_name and fo.model_name != model_name:
                raise ConfigError(f"{model_from} and {path} name different base models ({model_name} and "
                                  f"{fo.model_name})")
            model_name, model_from = fo.model_name, path
        notes += fo.ignored
    if method == "qlora":
        notes = [n for n in notes if not (n.field == "peft_type" and n.kind == ASSUMED)]
    elif method in ("lora", "full"):
        for k in ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype"):
            options.pop(k, None)
    if method is not None and method not in METHODS:
        raise ConfigError(f"unknown method {method!r}")
    return FileOptions(method, options, notes, model_name)


def describe_ignored(notes) -> list[str]:
    """Lines for the user: assumptions and not-modelled fields one per line, no-effect fields one line per file."""
    lines = [f"  - {n}" for n in notes if n.kind == ASSUMED]
    lines += [f"  - {n}" for n in notes if n.kind == NOT_MODELLED]
    by_file: dict[str, list[str]] = {}
    for n in notes:
        if n.kind == NO_EFFECT:
            by_file.setdefault(n.file, []).append(n.field)
    for f, keys in by_file.items():
        lines.append(f"  - {f}: ignored, no effect on memory: {', '.join(keys)}")
    return lines


__all__ = ["load_options", "FileOptions", "FieldNote", "read_config_file", "detect_kind", "options_from_dict",
           "describe_ignored", "NO_EFFECT", "NOT_MODELLED", "ASSUMED"]
