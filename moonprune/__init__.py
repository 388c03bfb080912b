"""moonprune: sparse models that still know when they do not know (MOON), shipped as ONNX."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
