"""Benchmarks: ``compare`` trains architectures side by side at equal k.

The names below are imported on first use, so that the command line can read its
arguments (``compare --help``) without importing torch or SAELens.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sae_lens_sampled.benchmark.compare import run_compare
    from sae_lens_sampled.benchmark.config import CompareConfig
    from sae_lens_sampled.benchmark.specs import DEFAULT_RUNS, RunSpec, parse_run_specs
    from sae_lens_sampled.benchmark.synthetic import default_synthetic_model_config

_LAZY: dict[str, str] = {
    "DEFAULT_RUNS": "sae_lens_sampled.benchmark.specs",
    "CompareConfig": "sae_lens_sampled.benchmark.config",
    "RunSpec": "sae_lens_sampled.benchmark.specs",
    "default_synthetic_model_config": "sae_lens_sampled.benchmark.synthetic",
    "parse_run_specs": "sae_lens_sampled.benchmark.specs",
    "run_compare": "sae_lens_sampled.benchmark.compare",
}

__all__ = [
    "DEFAULT_RUNS",
    "CompareConfig",
    "RunSpec",
    "default_synthetic_model_config",
    "parse_run_specs",
    "run_compare",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
