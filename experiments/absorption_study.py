"""Absorption of each architecture on the compare default data, over seeds.

Trains the runs the way ``compare`` does (SAELens ``SyntheticSAERunner``, the same
runner settings) and scores ground-truth absorption twice: with the per-token
inference encode (the SAE a user loads) and with the training SAE's batch rule over
eval batches of the training batch size. Prints a mean ± std table and writes one
JSON record per run and seed::

    python -m experiments.absorption_study --quick --seeds 0,1,2 \
        --output absorption-study
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from sae_lens import LoggingConfig
from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig
from sae_lens.synthetic.firing_probabilities import ZipfianFiringProbabilityConfig
from sae_lens.synthetic.hierarchy import HierarchyConfig
from sae_lens.synthetic.synthetic_sae_runner import (
    SyntheticSAERunner,
    SyntheticSAERunnerConfig,
)

from sae_lens_sampled.benchmark.absorption import absorption_metrics
from sae_lens_sampled.benchmark.compare import (
    QUICK_SETTINGS,
    CompareConfig,
    default_synthetic_model_config,
)
from sae_lens_sampled.benchmark.config import DEFAULT_EVAL_SAMPLES
from sae_lens_sampled.benchmark.runs import batch_rule_view, to_inference_sae
from sae_lens_sampled.benchmark.specs import (
    RunSpec,
    build_sae_config,
    parse_run_specs,
    resolve_runs,
)


def absorption_toy_model_config(seed: int = 0) -> SyntheticModelConfig:
    """Data built to invite absorption: 40 features in 64 dimensions (no
    superposition), 8 parents x 4 mutually exclusive children, every magnitude
    about 1, and children compensated so that a parent almost never fires alone
    (true L0 about 3)."""
    return SyntheticModelConfig(
        num_features=40,
        hidden_dim=64,
        firing_probability=ZipfianFiringProbabilityConfig(
            exponent=0.7, max_prob=0.4, min_prob=0.05
        ),
        hierarchy=HierarchyConfig(
            total_root_nodes=8,
            branching_factor=4,
            max_depth=1,
            mutually_exclusive_portion=1.0,
            compensate_probabilities=True,
        ),
        mean_firing_magnitudes=1.0,
        std_firing_magnitudes=0.1,
        seed=seed,
    )


DATA = {"default": default_synthetic_model_config, "toy": absorption_toy_model_config}

STUDY_RUNS = (
    "topk,batchtopk,mutual_choice,feature_choice,"
    "sampled:pool_factor=4,score=l2,sampled:pool_factor=16,score=l2,sampled"
)


def train_synthetic(
    spec: RunSpec, synthetic_model: SyntheticModel, cfg: CompareConfig
) -> Any:
    """One training run with ``compare``'s runner settings; returns the training SAE."""
    sae_cfg = build_sae_config(
        spec, d_in=synthetic_model.cfg.hidden_dim, d_sae=cfg.d_sae, k=cfg.k
    )
    runner_cfg = SyntheticSAERunnerConfig(
        synthetic_model=synthetic_model.cfg,
        sae=sae_cfg,
        training_samples=cfg.steps * cfg.batch_size,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        lr_decay_steps=cfg.steps // 5,
        device=cfg.device,
        checkpoint_path=None,
        output_path=None,
        run_final_eval=False,
        dead_feature_window=cfg.dead_feature_window,
        feature_sampling_window=2 * cfg.dead_feature_window,
        logger=LoggingConfig(log_to_wandb=False),
    )
    torch.manual_seed(cfg.seed)
    runner = SyntheticSAERunner(runner_cfg, override_synthetic_model=synthetic_model)
    return runner.run().sae


class _Recorder:
    """Wraps an encode; keeps L0 and explained variance of what passes through."""

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], decode: Any):
        self.encode, self.decode = encode, decode
        self.active = self.rows = 0
        self.error = self.sum_sq = 0.0
        self.sum = torch.zeros((), dtype=torch.float64)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        codes = self.encode(x)
        self.active += int((codes != 0).sum())
        self.rows += x.shape[0]
        self.error += float((self.decode(codes) - x).pow(2).sum())
        self.sum = self.sum + x.sum(dim=0).double()  # [] grows to [d_in]
        self.sum_sq += float(x.double().pow(2).sum())
        return codes

    def l0(self) -> float:
        return self.active / self.rows

    def explained_variance(self) -> float:
        total = self.sum_sq - float((self.sum**2).sum()) / self.rows
        return 1.0 - self.error / total


def _score(
    encode: Any,
    decode: Any,
    W_dec: torch.Tensor,
    model: SyntheticModel,
    acts: torch.Tensor,
    batch_size: int,
) -> dict[str, Any]:
    recorder = _Recorder(encode, decode)
    result = absorption_metrics(recorder, W_dec, model, acts, batch_size=batch_size)
    return {
        **result.summary(),
        "l0": recorder.l0(),
        "explained_variance": recorder.explained_variance(),
        "per_parent": [
            {
                "feature": row.feature,
                "absorption": row.absorption,
                "eligible_tokens": row.eligible_tokens,
                "parent_latents": row.parent_latents,
                "no_parent_latent": row.no_parent_latent,
            }
            for row in result.per_parent
        ],
    }


def study_run(
    label: str,
    seed: int,
    steps: int,
    eval_samples: int,
    data: str = "default",
    k: float = CompareConfig.k,
    d_sae: int = CompareConfig.d_sae,
) -> dict[str, Any]:
    """Train one run at one seed and score it per token and under the batch rule."""
    torch.set_num_threads(1)
    (spec,) = parse_run_specs(label)
    cfg = CompareConfig(
        runs=[spec],
        steps=steps,
        seed=seed,
        eval_samples=eval_samples,
        output=None,
        k=k,
        d_sae=d_sae,
    )
    model = SyntheticModel(DATA[data](seed))
    start = time.perf_counter()
    sae = train_synthetic(spec, model, cfg)
    seconds = time.perf_counter() - start
    # The same eval draw as compare's (seed + 1), concatenated.
    torch.manual_seed(seed + 1)
    acts = model.activation_generator.sample(eval_samples)
    sae.eval()
    with torch.no_grad():
        inference = to_inference_sae(sae)
        record: dict[str, Any] = {
            "label": spec.label,
            "data": data,
            "k": k,
            "d_sae": d_sae,
            "seed": seed,
            "steps": steps,
            "train_seconds": seconds,
            "per_token": _score(
                inference.encode,
                inference.decode,
                inference.W_dec,
                model,
                acts,
                cfg.batch_size,
            ),
        }
        view = batch_rule_view(sae)
        record["batch_rule"] = (
            None
            if view is None
            else _score(view.encode, sae.decode, sae.W_dec, model, acts, cfg.batch_size)
        )
    return record


def mean_std(values: Sequence[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    if len(present) == 1:
        return f"{present[0]:.3f}"
    return f"{statistics.mean(present):.3f} ± {statistics.stdev(present):.3f}"


TABLE_COLUMNS = (
    ("absorption", "absorption"),
    ("absorption_fraction", "fraction"),
    ("absorption_uncompensated", "uncomp."),
    ("absorption_parent_latents", "|M_p|"),
    ("absorption_parents_without_latent", "no latent"),
    ("l0", "L0"),
    ("explained_variance", "EV"),
)


def format_study_table(records: list[dict[str, Any]]) -> str:
    labels = list(dict.fromkeys(r["label"] for r in records))
    header = ["run", "encode", *(title for _, title in TABLE_COLUMNS)]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for label in labels:
        runs = [r for r in records if r["label"] == label]
        for mode in ("per_token", "batch_rule"):
            scored = [r[mode] for r in runs if r[mode] is not None]
            if not scored:
                continue
            cells = [mean_std([s[key] for s in scored]) for key, _ in TABLE_COLUMNS]
            name = f"{label} (n={len(scored)})"
            lines.append(" | ".join([name, mode.replace("_", " "), *cells]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architectures", default=STUDY_RUNS)
    parser.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    parser.add_argument("--steps", type=int, default=CompareConfig.steps)
    parser.add_argument("--eval-samples", type=int, default=DEFAULT_EVAL_SAMPLES)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="compare --quick lengths: " + str(QUICK_SETTINGS),
    )
    parser.add_argument("--data", choices=sorted(DATA), default="default")
    parser.add_argument("--k", type=float, default=CompareConfig.k)
    parser.add_argument("--d-sae", type=int, default=CompareConfig.d_sae)
    parser.add_argument("--jobs", type=int, default=1, help="parallel processes")
    parser.add_argument("--output", default=None, help="directory for records.json")
    args = parser.parse_args(argv)
    steps, eval_samples = args.steps, args.eval_samples
    if args.quick:
        steps, eval_samples = QUICK_SETTINGS["steps"], QUICK_SETTINGS["eval_samples"]
    runs, _ = resolve_runs(parse_run_specs(args.architectures))
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [
        (spec.label, seed, steps, eval_samples, args.data, args.k, args.d_sae)
        for spec in runs
        for seed in seeds
    ]
    start = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            records = list(pool.map(study_run, *zip(*jobs, strict=True)))
    else:
        records = [study_run(*job) for job in jobs]
    print(format_study_table(records))
    print(
        f"total: {time.perf_counter() - start:.1f} s, data={args.data}, "
        f"steps={steps}, k={args.k}, d_sae={args.d_sae}"
    )
    if args.output:
        output = Path(args.output)
        output.mkdir(parents=True, exist_ok=True)
        (output / "records.json").write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
