"""The moonprune version, in one place.

``pyproject.toml`` reads it from here (``[tool.setuptools.dynamic]``), and everything
that records a version (the checkpoint, report.json, the ONNX metadata) imports
:data:`__version__` from this module, so a release changes one line.
"""

from __future__ import annotations

__version__ = "0.1.0"
