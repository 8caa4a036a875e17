"""Why a small Sampled-SAE pool stops the loss from falling: per-step pool dynamics.

Runs ``sae-lens-sampled compare`` (any of its arguments) with every ``sampled`` training
step instrumented, and writes ``pool_dynamics.json`` beside compare's results. Per run
and per step it records:

- ``mse``: the step's training MSE (SAELens's ``mse_loss``);
- ``churn``: the share of the pool that was not in the previous step's pool;
- ``mass_in_pool``: the share of the batch's activation mass (sum of the post-ReLU
  activations the rule ranks) on the pooled features;
- ``batchtopk_in_pool``: the share of the entries BatchTopK would select on the same
  activations (the batch's top ``k * B``) that lie on pooled features.

and per feature, the share of steps on which it was pooled. Summaries (first and last
fifth of the run) go to the terminal and into the JSON. Example (the figures of
docs/sampled.md, "Why the loss does not fall")::

    python -m experiments.pool_dynamics --activations acts.npy --d-sae 4096 --k 16 \\
        --steps 300 --architectures sampled:pool_factor=16,sampled:pool_fraction=0.25 \\
        --output dynamics_4096

Not part of the installed package: it patches the training SAE's class for the
duration of the run.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from sae_lens_sampled import SampledTrainingSAE
from sae_lens_sampled.benchmark.compare import main as compare_main
from sae_lens_sampled.selection import batch_budget, batch_topk


class Trace:
    """What one training run's steps did, step by step."""

    def __init__(self, label: str, d_sae: int) -> None:
        self.label = label
        self.pooled_steps = torch.zeros(d_sae, dtype=torch.long)
        self.previous: torch.Tensor | None = None
        self.steps: list[dict[str, float]] = []

    def record(self, sae: SampledTrainingSAE, hidden_pre: torch.Tensor) -> None:
        if sae.step_pool is None:
            return
        pool = sae.step_pool.pool
        acts = torch.relu(hidden_pre.detach().flatten(end_dim=-2)).float()
        if sae.cfg.rescale_acts_by_decoder_norm:
            acts = acts * sae.W_dec.detach().norm(dim=-1).float()
        d_sae = acts.shape[1]
        in_pool = torch.zeros(d_sae, dtype=torch.bool)
        if pool is None:
            in_pool.fill_(True)
        else:
            in_pool[pool.cpu()] = True
        self.pooled_steps += in_pool.long()
        mass = acts.sum(dim=0).cpu()
        chosen = batch_topk(acts, batch_budget(sae.cfg.k, acts.shape[0])) != 0
        chosen_cols = chosen.sum(dim=0).cpu()
        churn = 0.0
        if self.previous is not None:
            stayed = (in_pool & self.previous).sum() / in_pool.sum()
            churn = 1.0 - float(stayed)
        self.previous = in_pool
        self.steps.append(
            {
                "churn": churn,
                "mass_in_pool": float(mass[in_pool].sum() / mass.sum()),
                "batchtopk_in_pool": float(
                    chosen_cols[in_pool].sum() / chosen_cols.sum()
                ),
            }
        )

    def add_mse(self, mse: float) -> None:
        if self.steps:
            self.steps[-1]["mse"] = mse

    def summary(self) -> dict[str, Any]:
        n = len(self.steps)
        fifth = max(1, n // 5)

        def mean(key: str, rows: list[dict[str, float]]) -> float:
            values = [row[key] for row in rows if key in row]
            return statistics.fmean(values) if values else float("nan")

        share = self.pooled_steps.double() / max(1, n)
        out: dict[str, Any] = {"label": self.label, "steps": n}
        for part, rows in (
            ("first", self.steps[:fifth]),
            ("last", self.steps[-fifth:]),
        ):
            for key in ("mse", "churn", "mass_in_pool", "batchtopk_in_pool"):
                out[f"{key}_{part}_fifth"] = mean(key, rows)
        out["features_pooled_under_1pct_of_steps"] = int((share < 0.01).sum())
        out["features_pooled_over_90pct_of_steps"] = int((share > 0.9).sum())
        out["features_never_pooled"] = int((share == 0).sum())
        out["pooled_share_quartiles"] = [
            float(q)
            for q in torch.quantile(
                share, torch.tensor([0.25, 0.5, 0.75], dtype=share.dtype)
            )
        ]
        return out


@contextmanager
def traced(traces: list[Trace]) -> Iterator[None]:
    """Record every sampled training step while the block runs."""
    original_update = SampledTrainingSAE.update_state
    original_forward = SampledTrainingSAE.training_forward_pass

    def current(sae: SampledTrainingSAE) -> Trace:
        if not traces or getattr(sae, "_trace_id", None) != id(traces[-1]):
            label = f"sampled pool_factor={sae.cfg.pool_factor} pool_fraction={sae.cfg.pool_fraction}"
            traces.append(Trace(label, sae.cfg.d_sae))
            sae._trace_id = id(traces[-1])  # type: ignore[assignment]
        return traces[-1]

    def update_state(
        sae: SampledTrainingSAE, feature_acts: torch.Tensor, hidden_pre: torch.Tensor
    ) -> torch.Tensor:
        if sae._in_training_step:
            current(sae).record(sae, hidden_pre)
        return original_update(sae, feature_acts, hidden_pre)

    def training_forward_pass(sae: SampledTrainingSAE, step_input: Any) -> Any:
        output = original_forward(sae, step_input)
        current(sae).add_mse(float(output.losses["mse_loss"]))
        return output

    SampledTrainingSAE.update_state = update_state  # type: ignore[method-assign,assignment]
    SampledTrainingSAE.training_forward_pass = training_forward_pass  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        SampledTrainingSAE.update_state = original_update  # type: ignore[method-assign]
        SampledTrainingSAE.training_forward_pass = original_forward  # type: ignore[method-assign]


def output_dir(argv: Sequence[str]) -> Path:
    args = list(argv)
    if "--output" in args:
        return Path(args[args.index("--output") + 1])
    return Path("compare-results")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    traces: list[Trace] = []
    with traced(traces):
        status = compare_main(argv)
    if status != 0:
        return status
    summaries = [trace.summary() for trace in traces]
    for summary in summaries:
        print(json.dumps(summary))
    out = output_dir(argv)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "summaries": summaries,
        "steps": [{"label": t.label, "steps": t.steps} for t in traces],
        "pooled_share": [
            (t.pooled_steps.double() / max(1, len(t.steps))).tolist() for t in traces
        ],
    }
    (out / "pool_dynamics.json").write_text(json.dumps(payload))
    return status


if __name__ == "__main__":
    sys.exit(main())
