"""The built-in GPU catalog: data only.

memory_bytes: what the driver reports as total memory (nvidia-smi "Total" in MiB * 2**20; rocm-smi bytes for
AMD).  These are the values users see in nvidia-smi on these cards; they are below the marketed capacity because
the driver reserves some memory (ECC, firmware).  bf16_tflops: dense tensor-core peak from the vendor datasheet
(sparse figures are 2x and are not used).  bandwidth_gbps: datasheet memory bandwidth, GB/s.

Prices are typical on-demand prices for one GPU at public clouds, as remembered by the maintainers for the date
given; they move often: override them with ``--price`` in ``plan`` / ``cost``.
"""

from __future__ import annotations

from .gpus import GPUSpec

MiB = 1024**2
_PRICE_DATE = "2025-06"
_SMI = "nvidia-smi memory.total as reported by the driver"


def _g(name, mib, tflops, bw, price, price_source, aliases=(), vendor="NVIDIA", notes="", memory_bytes=None,
       memory_source=_SMI):
    return GPUSpec(name=name, memory_bytes=memory_bytes if memory_bytes is not None else mib * MiB,
                   bf16_tflops=tflops, bandwidth_gbps=bw, price_usd_per_hour=price, price_as_of=_PRICE_DATE,
                   price_source=price_source, vendor=vendor, aliases=tuple(aliases), memory_source=memory_source,
                   notes=notes)


GPUS: tuple[GPUSpec, ...] = (
    _g("T4", 15360, 65.0, 320, 0.526, "AWS g4dn.xlarge on-demand (us-east-1)", ("tesla-t4", "nvidia-t4"),
       notes="no bf16 support: TFLOP/s is fp16; bf16 training falls back to slow paths"),
    _g("V100-16GB", 16160, 125.0, 900, 3.06, "AWS p3.2xlarge on-demand (us-east-1)", ("v100", "tesla-v100"),
       notes="no bf16 support: TFLOP/s is fp16"),
    _g("V100-32GB", 32510, 125.0, 900, 3.90, "AWS p3dn.24xlarge per GPU", ("v100-32g",),
       notes="no bf16 support: TFLOP/s is fp16"),
    _g("RTX-3060-12GB", 12288, 51.0, 360, 0.10, "community GPU marketplaces (typical)", ("rtx3060", "3060")),
    _g("RTX-3090", 24576, 71.0, 936, 0.22, "RunPod community cloud", ("rtx3090", "3090", "geforce-rtx-3090")),
    _g("RTX-4080", 16376, 97.5, 717, 0.30, "community GPU marketplaces (typical)", ("rtx4080", "4080")),
    _g("RTX-4090", 24564, 165.2, 1008, 0.69, "RunPod secure cloud", ("rtx4090", "4090", "geforce-rtx-4090")),
    _g("RTX-5090", 32607, 209.5, 1792, 0.89, "RunPod secure cloud", ("rtx5090", "5090", "geforce-rtx-5090")),
    _g("A10G", 23028, 70.0, 600, 1.006, "AWS g5.xlarge on-demand (us-east-1)", ("a10g", "nvidia-a10g")),
    _g("A10", 23028, 125.0, 600, 0.75, "Lambda Cloud on-demand", ("nvidia-a10",)),
    _g("L4", 23034, 121.0, 300, 0.805, "AWS g6.xlarge on-demand (us-east-1)", ("nvidia-l4",)),
    _g("RTX-A6000", 49140, 154.8, 768, 0.80, "Lambda Cloud on-demand", ("a6000", "rtx-a6000", "rtxa6000")),
    _g("RTX-6000-Ada", 49140, 364.2, 960, 1.03, "RunPod secure cloud", ("rtx6000ada", "6000-ada", "rtx-6000")),
    _g("L40", 46068, 181.0, 864, 0.99, "RunPod secure cloud", ("nvidia-l40",)),
    _g("L40S", 46068, 362.0, 864, 0.86, "RunPod secure cloud", ("l40s", "nvidia-l40s")),
    _g("A100-40GB", 40960, 312.0, 1555, 1.29, "Lambda Cloud on-demand (A100 SXM4 40GB)",
       ("a100-40g", "a100-sxm4-40gb", "a100 40gb", "a100")),
    _g("A100-80GB", 81920, 312.0, 2039, 1.79, "Lambda Cloud on-demand (A100 SXM4 80GB)",
       ("a100-80g", "a100-sxm4-80gb", "a100 80gb")),
    _g("H100-PCIe", 81559, 756.0, 2000, 2.49, "Lambda Cloud on-demand", ("h100 pcie", "h100-pcie-80gb")),
    _g("H100-SXM", 81559, 989.0, 3350, 2.99, "Lambda Cloud on-demand (8x H100 SXM, per GPU)",
       ("h100", "h100-sxm5", "h100-80gb-hbm3", "h100 80gb hbm3")),
    _g("H100-NVL", 95830, 835.0, 3900, 3.10, "Azure NC H100 v5 per GPU (typical)", ("h100nvl",)),
    _g("H200", 143771, 989.0, 4800, 3.79, "RunPod secure cloud", ("nvidia-h200", "h200-sxm", "h200 141gb")),
    _g("B200", 183359, 2250.0, 8000, 5.99, "Lambda Cloud on-demand (8x B200, per GPU)", ("nvidia-b200",),
       notes="dense bf16 from the HGX B200 datasheet (4.5 PFLOP/s is 2:4 sparse)"),
    _g("MI300X", 0, 1307.4, 5300, 2.49, "typical neocloud on-demand", ("amd-mi300x", "instinct-mi300x"),
       vendor="AMD", memory_bytes=205_822_885_888, memory_source="rocm-smi VRAM Total Memory (B)",
       notes="ROCm: bitsandbytes 4-bit support and allocator behaviour differ from CUDA"),
)
