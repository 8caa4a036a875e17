"""Benchmarks: ``compare`` trains architectures side by side at equal k."""

from sae_lens_sampled.benchmark.compare import (
    CompareConfig,
    default_synthetic_model_config,
    run_compare,
)
from sae_lens_sampled.benchmark.specs import DEFAULT_RUNS, RunSpec, parse_run_specs

__all__ = [
    "DEFAULT_RUNS",
    "CompareConfig",
    "RunSpec",
    "default_synthetic_model_config",
    "parse_run_specs",
    "run_compare",
]
