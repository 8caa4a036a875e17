"""Benchmarks: ``compare`` trains architectures side by side at equal k."""

from sae_lens_sampled.benchmark.compare import run_compare
from sae_lens_sampled.benchmark.config import CompareConfig
from sae_lens_sampled.benchmark.specs import DEFAULT_RUNS, RunSpec, parse_run_specs
from sae_lens_sampled.benchmark.synthetic import default_synthetic_model_config

__all__ = [
    "DEFAULT_RUNS",
    "CompareConfig",
    "RunSpec",
    "default_synthetic_model_config",
    "parse_run_specs",
    "run_compare",
]
