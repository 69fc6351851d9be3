"""Local GPU detection (lora_budget.gpus.detect_gpus, DetectedGPU.as_gpu_spec) with a stand-in NVML module, the
no-NVML path, ``lora-budget gpus --detect``, and ``commands.ask.default_gpu`` (fit without --gpu)."""

from __future__ import annotations

import json
import sys
import types

import pytest
from click.testing import CliRunner

from lora_budget.cli import cli
from lora_budget.commands.ask import default_gpu
from lora_budget.errors import ConfigError
from lora_budget.gpus import DetectedGPU, detect_gpus, get_gpu

MiB = 2**20
GiB = 2**30


class FakeNVML:
    """Answers like pynvml: names as bytes (nvidia-ml-py < 11.5) or str, memory as an object with total/free/used
    in bytes, the driver version as bytes or str.  Records nvmlShutdown."""

    def __init__(self, devices, driver="550.54.15", fail_init=False, fail_on=None):
        self.devices = devices
        self.driver = driver
        self.fail_init = fail_init
        self.fail_on = fail_on
        self.shutdown = 0

    def nvmlInit(self):
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        self.shutdown += 1

    def nvmlSystemGetDriverVersion(self):
        return self.driver

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("handle", i)

    def nvmlDeviceGetName(self, h):
        if self.fail_on == "name":
            raise RuntimeError("GPU is lost")
        return self.devices[h[1]][0]

    def nvmlDeviceGetMemoryInfo(self, h):
        name, total, free = self.devices[h[1]]
        return types.SimpleNamespace(total=total, free=free, used=total - free)


RTX4090_TOTAL = 24564 * MiB
A100_TOTAL = 81920 * MiB


def test_parses_names_memory_and_driver():
    nvml = FakeNVML([(b"NVIDIA GeForce RTX 4090", RTX4090_TOTAL, 23 * GiB),
                     ("NVIDIA A100-SXM4-80GB", A100_TOTAL, 80 * GiB)], driver=b"535.104.05")
    found = detect_gpus(nvml)
    assert found == [
        DetectedGPU(index=0, name="NVIDIA GeForce RTX 4090", total_bytes=RTX4090_TOTAL, free_bytes=23 * GiB,
                    used_bytes=RTX4090_TOTAL - 23 * GiB, driver="535.104.05"),
        DetectedGPU(index=1, name="NVIDIA A100-SXM4-80GB", total_bytes=A100_TOTAL, free_bytes=80 * GiB,
                    used_bytes=A100_TOTAL - 80 * GiB, driver="535.104.05"),
    ]
    assert all(isinstance(d.total_bytes, int) and isinstance(d.name, str) for d in found)
    assert nvml.shutdown == 1


def test_no_gpu_no_driver_or_a_failing_device_give_an_empty_list():
    assert detect_gpus(FakeNVML([])) == []
    assert detect_gpus(FakeNVML([("X", 1, 1)], fail_init=True)) == []
    failing = FakeNVML([("X", 1, 1)], fail_on="name")
    assert detect_gpus(failing) == []
    assert failing.shutdown == 1


def test_without_nvidia_ml_py(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert detect_gpus() == []


def test_cli_detect_without_nvml_says_so_plainly(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    r = CliRunner().invoke(cli, ["gpus", "--detect"])
    assert r.exit_code == 0
    assert "No GPU found through NVML" in r.stdout and "--gpu" in r.stdout
    r = CliRunner().invoke(cli, ["gpus", "--detect", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout) == []


def test_cli_detect_with_a_gpu(monkeypatch):
    fake = FakeNVML([("NVIDIA GeForce RTX 4090", RTX4090_TOTAL, 20 * GiB)])
    module = types.ModuleType("pynvml")
    for attr in ("nvmlInit", "nvmlShutdown", "nvmlSystemGetDriverVersion", "nvmlDeviceGetCount",
                 "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetName", "nvmlDeviceGetMemoryInfo"):
        setattr(module, attr, getattr(fake, attr))
    monkeypatch.setitem(sys.modules, "pynvml", module)
    r = CliRunner().invoke(cli, ["gpus", "--detect", "--json"])
    assert r.exit_code == 0
    assert json.loads(r.stdout)[0]["free_bytes"] == 20 * GiB
    r = CliRunner().invoke(cli, ["gpus", "--detect"])
    assert "#0 NVIDIA GeForce RTX 4090" in r.stdout and "free 20.00 GiB" in r.stdout


def test_as_gpu_spec_uses_free_or_total_memory_and_the_catalog_speeds():
    d = DetectedGPU(0, "NVIDIA GeForce RTX 4090", RTX4090_TOTAL, 20 * GiB, RTX4090_TOTAL - 20 * GiB, "550")
    free = d.as_gpu_spec()
    assert free.memory_bytes == 20 * GiB
    assert free.bf16_tflops == get_gpu("rtx-4090").bf16_tflops
    assert "free" in free.name
    assert d.as_gpu_spec(use_free=False).memory_bytes == RTX4090_TOTAL


def test_as_gpu_spec_of_an_unknown_gpu_keeps_the_memory():
    d = DetectedGPU(0, "NVIDIA Made-Up 9000", 10 * GiB, 9 * GiB, GiB, "550")
    spec = d.as_gpu_spec()
    assert spec.memory_bytes == 9 * GiB and spec.bf16_tflops == 0.0


@pytest.mark.parametrize("nvml_name, catalog", [
    ("NVIDIA H100 80GB HBM3", "H100-SXM"),
    ("NVIDIA RTX A6000", "RTX-A6000"),
    ("Tesla T4", "T4"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
])
def test_as_gpu_spec_finds_the_catalog_entry(nvml_name, catalog):
    d = DetectedGPU(0, nvml_name, 10 * GiB, 9 * GiB, GiB, "550")
    assert d.as_gpu_spec().bf16_tflops == get_gpu(catalog).bf16_tflops


# ---- default_gpu: fit / ask without a GPU ------------------------------------------------------------------------
def test_default_gpu_uses_the_free_memory_of_the_emptiest_gpu():
    nvml = FakeNVML([("NVIDIA GeForce RTX 4090", RTX4090_TOTAL, 2 * GiB),
                     ("NVIDIA GeForce RTX 4090", RTX4090_TOTAL, 23 * GiB)])
    spec, why = default_gpu(nvml)
    assert spec.memory_bytes == 23 * GiB
    assert "#1" in why and "NVML" in why and "free" in why and "2 found" in why


def test_default_gpu_single():
    spec, why = default_gpu(FakeNVML([("NVIDIA A100-SXM4-80GB", A100_TOTAL, 79 * GiB)]))
    assert spec.memory_bytes == 79 * GiB
    assert "found" not in why


def test_default_gpu_without_a_gpu_is_a_clear_error(monkeypatch):
    with pytest.raises(ConfigError) as e:
        default_gpu(FakeNVML([]))
    assert str(e.value).startswith("no GPU detected through NVML") and "--gpu" in str(e.value)
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(ConfigError):
        default_gpu()
