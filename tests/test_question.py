"""Plain questions (lora_budget.question) and the ``ask`` command (lora_budget.commands.ask)."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
from click.testing import CliRunner

from lora_budget.cli import cli
from lora_budget.commands.ask import answer_question, fit_dict
from lora_budget.errors import ConfigError
from lora_budget.estimate import estimate, suggestions
from lora_budget.finetune import make_config
from lora_budget.gpus import get_gpu
from lora_budget.models import get_model
from lora_budget.question import EXAMPLE, UnreadableQuestion, parse_question

GB = 10**9
GiB = 2**30


@pytest.fixture
def no_nvml(monkeypatch):
    """No pynvml importable: detection finds no GPU whatever machine runs the tests."""
    monkeypatch.setitem(sys.modules, "pynvml", None)


def fake_nvml(devices):
    """A stand-in pynvml module: devices = [(name, total, free)]."""
    mod = types.SimpleNamespace()
    mod.nvmlInit = lambda: None
    mod.nvmlShutdown = lambda: None
    mod.nvmlSystemGetDriverVersion = lambda: "550.54.15"
    mod.nvmlDeviceGetCount = lambda: len(devices)
    mod.nvmlDeviceGetHandleByIndex = lambda i: i
    mod.nvmlDeviceGetName = lambda h: devices[h][0]
    mod.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=devices[h][1], free=devices[h][2],
                                                                  used=devices[h][1] - devices[h][2])
    return mod


# (question, model, gpu name, GPU bytes or None for a catalog GPU, methods, options)
READABLE = [
    ("can I fit 65B on a 48GB GPU with QLoRA?", "llama-65b", "48GB", 48 * GB, ("qlora",), {}),
    ("can I fit 65B on a 48GB GPU?", "llama-65b", "48GB", 48 * GB, (), {}),
    ("Can I full fine-tune Llama-3.1-8B on an A100 80GB?", "llama-3.1-8b", "A100-80GB", None, ("full",), {}),
    ("llama 2 7b on a 4090 with lora rank 16 at 4k context", "llama-2-7b", "RTX-4090", None, ("lora",),
     {"lora_rank": 16, "seq_len": 4096}),
    ("mistral 7b on 24 GB with 4-bit", "mistral-7b", "24GB", 24 * GB, ("qlora",), {}),
    ("8x7B on an H100 with qlora, r=64, seq 2048", "mixtral-8x7b", "H100-SXM", None, ("qlora",),
     {"lora_rank": 64, "seq_len": 2048}),
    ("qwen 7b on a 3090 lora", "qwen2.5-7b", "RTX-3090", None, ("lora",), {}),
    ("will 7B with 8-bit adam fit on a 4090 for a full fine-tune", "llama-2-7b", "RTX-4090", None, ("full",),
     {"optim": "adamw_8bit"}),
    ("1.5b on a T4, 2048 tokens, batch size 8", "qwen2.5-1.5b", "T4", None, (), {"seq_len": 2048, "batch_size": 8}),
    ("gemma 2 9b on L4 qlora without gradient checkpointing", "gemma-2-9b", "L4", None, ("qlora",),
     {"gradient_checkpointing": False}),
    ("Qwen/Qwen2.5-7B-Instruct on 24GiB lora, bs=4, seq_len=1024", "qwen2.5-7b", "24GiB", 24 * GiB, ("lora",),
     {"batch_size": 4, "seq_len": 1024}),
    ("phi 3 14b on an A6000", "phi-3-medium", "RTX-A6000", None, (), {}),
    ("80GB A100 with 65B lora", "llama-65b", "A100-80GB", None, ("lora",), {}),
    ("llama 3 8b on a 4090 with flash attention and lora alpha 32, grad accum 8", "llama-3-8b", "RTX-4090", None,
     ("lora",), {"lora_alpha": 32, "gradient_accumulation_steps": 8, "attn_implementation": "flash_attention_2"}),
    ("fine-tune llama 70B with QLoRA on one A100 80GB", "llama-3.1-70b", "A100-80GB", None, ("qlora",), {}),
    ("20B on 80GB qlora", "llama-shaped-20b", "80GB", 80 * GB, ("qlora",), {}),
    ("Mixtral 8x7B, qlora, H200, 8k context", "mixtral-8x7b", "H200", None, ("qlora",), {"seq_len": 8192}),
    ("LLaMA-65B QLoRA 48 GiB batch 2 with gradient checkpointing", "llama-65b", "48GiB", 48 * GiB, ("qlora",),
     {"batch_size": 2, "gradient_checkpointing": True}),
    ("llama 2 13b on an rtx 3090 nf4", "llama-2-13b", "RTX-3090", None, ("qlora",), {"bnb_4bit_quant_type": "nf4"}),
    ("gpt-3 on an H100 with lora", "gpt3-175b", "H100-SXM", None, ("lora",), {}),
    ("should I use lora or qlora for 13B on a 24GB card", "llama-2-13b", "24GB", 24 * GB, ("lora", "qlora"), {}),
    ("full-parameter 1B on a 4090 with paged adamw 8bit", "llama-3.2-1b", "RTX-4090", None, ("full",),
     {"optim": "paged_adamw_8bit"}),
    ("70B QLoRA on an H100 NVL at 2k context and rank 8", "llama-3.1-70b", "H100-NVL", None, ("qlora",),
     {"seq_len": 2048, "lora_rank": 8}),
    ("can i finetune a 3B model on a 16 GB GPU with lora and no gc", "llama-3.2-3b", "16GB", 16 * GB, ("lora",),
     {"gradient_checkpointing": False}),
    ("llama-3.1-405b qlora on a B200", "llama-3.1-405b", "B200", None, ("qlora",), {}),
    ("7B on an A100 40GB with sequence length of 4096 and a batch size of 4", "llama-2-7b", "A100-40GB", None, (),
     {"seq_len": 4096, "batch_size": 4}),
    ("squeeze 65B onto a 48GB GPU using 4 bit", "llama-65b", "48GB", 48 * GB, ("qlora",), {}),
    ("Llama 2 70B chat with QLoRA on an 80 GB GPU", "llama-2-70b", "80GB", 80 * GB, ("qlora",), {}),
    ("Mistral-7B-Instruct-v0.3 on a 3060 with qlora at 1k context", "mistral-7b-v0.3", "RTX-3060-12GB", None,
     ("qlora",), {"seq_len": 1024}),
    ("8\u00d77B on H200 qlora", "mixtral-8x7b", "H200", None, ("qlora",), {}),
    ("is 24GB enough for 13B lora?", "llama-2-13b", "24GB", 24 * GB, ("lora",), {}),
]

# (question, words the one-line refusal must contain)
REFUSED = [
    ("fine-tune llama 70B with QLoRA on 2x A100", "2 GPUs"),
    ("8B on two 4090s", "2 GPUs"),
    ("falcon 7b on a 4090", "falcon 7b"),
    ("code llama 34b on an a100", "code llama 34b"),
    ("gpt-j 6b on a 4090", "gpt-j 6b"),
    ("can I fit it on a 4090?", "cannot find a model"),
    ("hello", "cannot find a model"),
    ("", "empty question"),
    ("7B on a 48 GPU", "no unit"),
    ("65B or 70B on 48GB qlora", "2 models"),
    ("7B on a 4090 or an A100", "2 GPUs"),
    ("7B on a P100", "unknown GPU 'P100'"),
    ("llama-2-13b in 8-bit on a 4090", "8-bit base"),
    ("RTX 4090 48GB with 7B", "not 48GB"),
    ("qwen 9b on a 4090", "no qwen model near 9B"),
    ("7B on a 4090 at 2048 tokens and 4096 tokens", "two values for seq_len"),
]


@pytest.mark.parametrize("question, model, gpu, gpu_bytes, methods, options", READABLE)
def test_readable_questions(question, model, gpu, gpu_bytes, methods, options):
    q = parse_question(question)
    assert q.model.name == model
    assert q.gpu.name == gpu
    if gpu_bytes is not None:
        assert q.gpu.memory_bytes == gpu_bytes
    else:
        assert q.gpu.memory_bytes == get_gpu(gpu).memory_bytes
    assert q.methods == methods
    assert q.options == options
    for r in q.readings:
        assert r.words and r.words.lower() in question.lower(), r  # every reading quotes the question


@pytest.mark.parametrize("question, words", REFUSED)
def test_refused_questions(question, words, no_nvml):
    with pytest.raises(UnreadableQuestion) as e:
        answer_question(question)
    msg = str(e.value)
    assert words in msg
    assert EXAMPLE in msg and "\n" not in msg


def test_table_is_at_least_thirty_phrasings():
    assert len(READABLE) + len(REFUSED) >= 30


def test_no_gpu_and_none_detected_is_refused(no_nvml):
    with pytest.raises(UnreadableQuestion) as e:
        answer_question("can I fit 65B with QLoRA?")
    assert "names no GPU" in str(e.value)


def test_no_gpu_uses_the_detected_gpu_free_memory():
    nvml = fake_nvml([("NVIDIA GeForce RTX 4090", 24564 * 2**20, 20 * GiB)])
    ans = answer_question("can I fit 7B with QLoRA?", nvml=nvml)
    assert ans.gpu.memory_bytes == 20 * GiB
    assert "not in the question" in ans.gpu_line and "NVML" in ans.gpu_line


def test_bare_capacity_is_read_exactly_as_written():
    assert parse_question("7B on 48GB").gpu.memory_bytes == 48_000_000_000
    assert parse_question("7B on 48 GiB").gpu.memory_bytes == 48 * 2**30


def test_ask_answers_like_fit():
    """The done-when check: ask "can I fit 65B on a 48GB GPU?" gives fit llama-65b --method qlora --gpu 48GB."""
    ans = answer_question("can I fit 65B on a 48GB GPU with QLoRA?")
    est = estimate(get_model("llama-65b"), make_config("qlora"), get_gpu("48GB"))
    assert ans.chosen.estimate.as_dict() == est.as_dict()
    want = fit_dict(est, [] if est.fits else suggestions(est))
    assert fit_dict(ans.chosen.estimate, ans.suggestions) == want


def test_method_not_given_answers_all_three_and_details_the_first_that_fits():
    ans = answer_question("can I fit 65B on a 48GB GPU?")
    assert [a.method for a in ans.answers] == ["full", "lora", "qlora"]
    fits = {a.method: a.estimate.fits for a in ans.answers}
    for a in ans.answers:
        assert a.estimate.as_dict() == estimate(get_model("llama-65b"), make_config(a.method),
                                                get_gpu("48GB")).as_dict()
    first = next((m for m in ("full", "lora", "qlora") if fits[m]), None)
    if first:
        assert ans.chosen.method == first
    else:
        assert ans.chosen.method == min(ans.answers, key=lambda a: a.estimate.device_total_bytes).method


def test_options_that_do_not_apply_to_full_are_dropped_with_a_note():
    ans = answer_question("7B on a 4090 with rank 16")
    full = next(a for a in ans.answers if a.method == "full")
    assert full.estimate is not None
    assert any("lora_rank=16 does not apply to full" in d for d in ans.dropped)
    lora = next(a for a in ans.answers if a.method == "lora")
    assert lora.estimate.config.lora_rank == 16


def test_one_method_with_an_option_it_refuses_is_an_error():
    with pytest.raises(ConfigError):
        answer_question("7B full fine-tune on a 4090 with rank 16")


def test_a_config_json_path(tmp_path):
    folder = tmp_path / "my-13b-model"
    folder.mkdir()
    cfg = get_model("llama-2-13b").to_hf_config()
    (folder / "config.json").write_text(json.dumps(cfg))
    q = parse_question(f"can I fit {folder / 'config.json'} on an A100 80GB with qlora")
    assert q.model.hidden_size == 5120 and q.model.num_hidden_layers == 40
    assert q.gpu.name == "A100-80GB" and q.methods == ("qlora",)
    with pytest.raises(UnreadableQuestion, match="no config.json"):
        parse_question(f"{tmp_path / 'missing' / 'config.json'} on a 4090")


def test_numbers_not_understood_are_listed():
    q = parse_question("7B on a 4090 with lora and 3 dogs")
    assert q.not_understood == ("3",)


# ---- the command ------------------------------------------------------------------------------------------------
def test_cli_ask_text():
    r = CliRunner().invoke(cli, ["ask", "can I fit 65B on a 48GB GPU with QLoRA?"])
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert out.startswith("Read as:")
    assert "model llama-65b (from '65B')" in out
    assert "gpu 48GB (from '48GB'): 48,000,000,000 bytes" in out
    est = estimate(get_model("llama-65b"), make_config("qlora"), get_gpu("48GB"))
    verdict = "YES: llama-65b with qlora fits" if est.fits else "NO: llama-65b with qlora does not fit"
    assert verdict in out
    assert "Assumptions:" in out


def test_cli_ask_words_without_quotes():
    r = CliRunner().invoke(cli, ["ask", "65B", "on", "48GB", "qlora"])
    assert r.exit_code == 0, r.output
    assert "model llama-65b" in r.stdout


def test_cli_ask_json():
    r = CliRunner().invoke(cli, ["ask", "--json", "can I fit 65B on a 48GB GPU?"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["read_as"]["gpu"]["memory_bytes"] == 48 * GB
    assert d["read_as"]["methods_asked"] == []
    assert [a["method"] for a in d["answers"]] == ["full", "lora", "qlora"]
    assert d["fit"]["method"] == d["chosen_method"]
    est = estimate(get_model("llama-65b"), make_config(d["chosen_method"]), get_gpu("48GB"))
    assert d["fit"]["device_total_bytes"] == est.device_total_bytes
    assert d["fit"]["fits"] == est.fits


def test_cli_ask_refusal_is_one_line_and_exit_1(no_nvml):
    r = CliRunner().invoke(cli, ["ask", "can I fit 65B?"])
    assert r.exit_code == 1
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "ask e.g." in lines[0]


def test_core_modules_stay_light():
    code = ("import sys, lora_budget.sizes, lora_budget.question, lora_budget.configfile, lora_budget.commands.ask;"
            "from lora_budget.commands.ask import answer_question;"
            "answer_question('can I fit 65B on a 48GB GPU?');"
            "bad = [m for m in ('torch', 'transformers', 'pandas', 'matplotlib', 'yaml') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
