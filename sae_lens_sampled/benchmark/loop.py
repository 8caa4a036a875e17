"""The training-and-evaluation loop of ``compare``, the same for every data source.

For each seed and each run: build the SAE config, seed torch, train through the
source, export the inference SAE in memory, evaluate it per token, under the
training SAE's batch rule and, with ``calibrate``, per token after
``calibrate_thresholds``; add the ground-truth metrics and save the inference SAE.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.sae import TrainingSAEConfig

from sae_lens_sampled.benchmark.config import CompareConfig
from sae_lens_sampled.benchmark.metrics import ground_truth_fields, rule_fields
from sae_lens_sampled.benchmark.runs import (
    base_result,
    batch_rule_view,
    run_dir_name,
    to_inference_sae,
)
from sae_lens_sampled.benchmark.source import DataSource
from sae_lens_sampled.benchmark.specs import RunSpec, build_sae_config
from sae_lens_sampled.calibration import calibrate_thresholds
from sae_lens_sampled.health import WINDOW_STEPS, HealthReport, TrainingHealthWarning
from sae_lens_sampled.saes.base import BatchLevelSAE

# Batch-rule draws per calibration batch that calibrate_thresholds averages
# (Sampled-SAE pools).
CALIBRATION_POOL_DRAWS = 8


def sae_config(cfg: CompareConfig, spec: RunSpec, d_in: int) -> TrainingSAEConfig:
    return build_sae_config(
        spec,
        d_in=d_in,
        d_sae=cfg.d_sae,
        k=cfg.k,
        normalize_activations=cfg.normalize_activations,
    )


def check_runs(cfg: CompareConfig, source: DataSource, runs: list[RunSpec]) -> None:
    """Build every run's config before anything trains, so that a bad setting or a
    ``d_in`` that does not match the data stops the comparison at once."""
    for spec in runs:
        built = sae_config(cfg, spec, source.d_in)
        if built.d_in != source.d_in:
            raise ValueError(
                f"architectures: {spec.label} sets d_in={built.d_in}, but the "
                f"{source.mode} data have d_in={source.d_in}"
            )


def compare_runs(
    cfg: CompareConfig,
    source: DataSource,
    runs: list[RunSpec],
    output: Path | None,
    results: list[dict[str, Any]],
    finished: dict[tuple[str, int], dict[str, Any]],
    on_result: Callable[[], None],
) -> None:
    """Append one result per run and seed to ``results``, seed by seed, and call
    ``on_result`` after each (to write what is finished so far). A run whose
    (label, seed) is in ``finished`` is not trained again: its result is taken
    from there."""
    check_runs(cfg, source, runs)
    seeds = cfg.seed_list
    for seed in seeds:
        started = False
        for index, spec in enumerate(runs, start=1):
            tag = f"[seed {seed}] " if len(seeds) > 1 else ""
            tag += f"[{index}/{len(runs)}] {spec.label}"
            kept = finished.get((spec.label, seed))
            if kept is not None:
                print(f"{tag}: kept from results.json")
                results.append(kept)
                continue
            print(tag, flush=True)
            if not started:
                source.start_seed(seed)
                started = True
            # One seed saves its runs in saes/ itself, several in saes/seed<N>/.
            seed_dir = Path("saes", f"seed{seed}") if len(seeds) > 1 else Path("saes")
            sae_dir = seed_dir / run_dir_name(index, spec)
            run_dir = output / sae_dir if output is not None else None
            result = train_and_evaluate(cfg, source, spec, seed, run_dir)
            if output is not None:
                # Where this run's SAE is (a resumed comparison may lay them out
                # differently from the runs it kept).
                result["sae_dir"] = sae_dir.as_posix()
            results.append(result)
            on_result()


def health_fields(sae: Any, l0: float | None, k: float) -> dict[str, Any]:
    """Whether the run learned: the training MSE's change over its last window (the
    plugin's SAEs track it) and the measured per-token L0 against k; each problem
    with its cause and the setting to change."""
    health = getattr(sae, "health", None)
    if health is None:
        report = HealthReport(None, WINDOW_STEPS, l0, k)
    else:
        report = dataclasses.replace(health(), l0_per_token=l0, k=k)
    gain = getattr(sae.cfg, "threshold_gain", None)
    return {
        "mse_window_change": report.mse_change,
        "health_flags": report.flags(),
        "health": report.problems(threshold_gain=gain),
    }


def train_and_evaluate(
    cfg: CompareConfig,
    source: DataSource,
    spec: RunSpec,
    seed: int,
    run_dir: Path | None,
) -> dict[str, Any]:
    """Train one run with ``seed`` and measure it; save its inference SAE."""
    sae_cfg = sae_config(cfg, spec, source.d_in)
    # Same initialisation, data stream and pool draws for every run of a seed.
    torch.manual_seed(seed)
    start = time.perf_counter()
    sae = source.train(sae_cfg, seed)
    seconds = time.perf_counter() - start

    result: dict[str, Any] = {"seed": seed}
    result.update(base_result(spec, sae, cfg.steps * cfg.batch_size, seconds))
    with warnings.catch_warnings():  # the table's health column reports it
        warnings.simplefilter("ignore", TrainingHealthWarning)
        inference = to_inference_sae(sae)
    per_token = source.evaluate(inference)
    result.update(rule_fields(per_token, ""))
    calibrated = None
    if cfg.calibrate and isinstance(inference, BatchLevelSAE):
        batches = source.calibration_batches()
        if batches is not None:
            # Per-token thresholds re-fitted so each feature fires as often as
            # under the batch rule, on samples that are neither training nor eval
            # data.
            recalibrated = copy.deepcopy(inference)
            with warnings.catch_warnings():  # rare features: expected on few rows
                warnings.simplefilter("ignore")
                calibrate_thresholds(
                    recalibrated,
                    batches,
                    batch_size=cfg.batch_size,
                    pool_draws=CALIBRATION_POOL_DRAWS,
                )
            calibrated = source.evaluate(recalibrated)
    result.update(rule_fields(calibrated, "_calibrated"))
    view = batch_rule_view(sae)
    batch = source.evaluate(view) if view is not None else None
    result.update(rule_fields(batch, "_batch"))
    result.update(ground_truth_fields(per_token))
    result.update(health_fields(sae, result["l0"], cfg.k))
    result["absorption"] = source.absorption(inference)
    result["absorption_batch"] = source.absorption(view) if view is not None else None
    result.update(source.probe(inference))
    if run_dir is not None:
        inference.save_model(run_dir)
    return result
