"""Byte units and size parsing.

Bytes are ``int`` everywhere inside lora_budget.  GiB (2**30) and GB (10**9) are different units and are
always printed with their own name: ``format_gib`` prints "GiB", ``format_gb`` prints "GB".

How a marketed capacity is read (``parse_size``): "48GB" means 48 * 10**9 bytes, "24GiB" means 24 * 2**30 bytes,
exactly as written.  Note that GPU vendors market memory in binary units written as "GB": an "RTX A6000 48 GB"
has 48 GiB of DRAM of which the driver reports 47.99 GiB (51,527,024,640 B) as total.  ``parse_size`` does not
guess: pass a catalog GPU name (``--gpu a6000``) to get the driver-reported capacity, or a bare size to get
exactly that many bytes.  So "48GB" (48.0e9 B = 44.70 GiB) is a stricter budget than the A6000 itself.
"""

from __future__ import annotations

import re

from .errors import ConfigError

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4
KB = 1000
MB = 1000**2
GB = 1000**3
TB = 1000**4

#: Bytes per element of the dtypes used by HF configs, torch and peft (names as in ``torch.dtype``).
DTYPE_BYTES = {
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "int8": 1,
    "uint8": 1,
    "int64": 8,
    "bool": 1,
}

#: Accepted spellings of the three float dtypes, normalised to their torch names.
DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "f32": "float32", "32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16", "16": "float16",
}

_UNITS = {
    "b": 1, "kb": KB, "mb": MB, "gb": GB, "tb": TB,
    "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB,
}

_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]i?b|b)\s*$", re.IGNORECASE)


def normalise_dtype(name: str) -> str:
    """Return the torch name ("bfloat16", "float16", "float32") for a dtype spelling, or raise ConfigError."""
    key = str(name).strip().lower().replace("torch.", "")
    if key not in DTYPE_ALIASES:
        raise ConfigError(f"unknown dtype {name!r}: use bfloat16, float16 or float32")
    return DTYPE_ALIASES[key]


def dtype_bytes(name: str) -> int:
    """Bytes per element of a dtype name (any spelling accepted by ``normalise_dtype``, or int8/uint8/int64)."""
    if name in DTYPE_BYTES:
        return DTYPE_BYTES[name]
    return DTYPE_BYTES[normalise_dtype(name)]


def is_size(text: str) -> bool:
    """True when ``text`` looks like a bare memory size such as "48GB" or "24 GiB"."""
    return bool(_SIZE_RE.match(str(text)))


def parse_size(text: str) -> int:
    """Parse "48GB" (decimal, 48e9 B) or "24GiB" (binary, 24*2**30 B) into an int number of bytes.

    A unit is required: "48" alone is ambiguous and is refused.
    """
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ConfigError(f"cannot read size {text!r}: write it with a unit, e.g. 48GB (10^9 B) or 48GiB (2^30 B)")
    number, unit = m.groups()
    value = float(number) * _UNITS[unit.lower()]
    if value <= 0:
        raise ConfigError(f"size {text!r} must be positive")
    return int(round(value))


def format_gib(n: int, digits: int = 2) -> str:
    """Format bytes as binary gibibytes, e.g. "44.70 GiB"."""
    return f"{n / GiB:,.{digits}f} GiB"


def format_gb(n: int, digits: int = 2) -> str:
    """Format bytes as decimal gigabytes, e.g. "48.00 GB"."""
    return f"{n / GB:,.{digits}f} GB"


def format_params(n: int) -> str:
    """Format a parameter count: 6,738,415,616 -> "6.74B"."""
    for div, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


def ceil_div(a: int, b: int) -> int:
    """Integer ceiling of a / b for non-negative ints."""
    return -(-a // b)


def round_up(n: int, multiple: int) -> int:
    """Round ``n`` up to a multiple of ``multiple``."""
    return ceil_div(n, multiple) * multiple
