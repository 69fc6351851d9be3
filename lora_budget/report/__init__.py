"""Reports and charts: predictions beside measurements, and the LoRA/QLoRA claims checked (optional extra).

``build_report`` / ``build_claims_report`` write a report folder (index.md, CSV, PNG + SVG charts), byte-stable on
regeneration.  ``tables`` computes the rows (pure Python); ``charts`` draws them with matplotlib, imported inside
the drawing functions only (``pip install 'lora_budget[report]'``).
"""

from __future__ import annotations

from .build import Report, build_claims_report, build_report

__all__ = ["Report", "build_report", "build_claims_report"]
