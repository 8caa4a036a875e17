"""Do similar features fire together, and does the reconstruction overshoot?

The measurement behind the co-firing table of ``docs/sampled.md``: for the SAEs a
``compare --activations`` run saved, on the same held-out rows, once per token
(``sae.encode``) and once under the batch rule (``encode_batch``):

- ``l0``: features fired per token;
- ``similar_pairs``: pairs of fired features whose decoder rows have cosine above
  ``--cosine`` (0.5), per token. A small sampled pool trains each feature to carry a
  direction alone in the pools it is drawn into; per token its near-copies can fire
  together;
- ``length_ratio``: ``||x_hat - b_dec|| / ||x - b_dec||``, per token, averaged: above
  1 the reconstruction overshoots the input.

::

    sae-lens-sampled compare --activations acts.npy --seeds 3 --output results
    python -m experiments.cofiring results
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE

from sae_lens_sampled.benchmark.activation_files import open_activations
from sae_lens_sampled.benchmark.activations import Ranges, read_batches
from sae_lens_sampled.benchmark.runs import batch_rule_view, run_directories

ENCODES = ("per_token", "batch_rule")


@dataclass
class CofiringTotals:
    """Sums over tokens, so that batches add up before the means are taken."""

    n_tokens: int = 0
    fired: float = 0.0
    similar_pairs: float = 0.0
    length_ratio: float = 0.0

    def __add__(self, other: CofiringTotals) -> CofiringTotals:
        return CofiringTotals(
            self.n_tokens + other.n_tokens,
            self.fired + other.fired,
            self.similar_pairs + other.similar_pairs,
            self.length_ratio + other.length_ratio,
        )

    def means(self) -> dict[str, float]:
        """Per-token means: ``l0``, ``similar_pairs``, ``length_ratio``."""
        n = max(self.n_tokens, 1)
        return {
            "l0": self.fired / n,
            "similar_pairs": self.similar_pairs / n,
            "length_ratio": self.length_ratio / n,
        }


@torch.no_grad()
def similar_rows(W_dec: torch.Tensor, cosine: float) -> torch.Tensor:
    """``[d_sae, d_sae]`` bool: decoder rows with cosine above ``cosine`` (a row is
    not similar to itself; a zero row is similar to none)."""
    norms = W_dec.norm(dim=-1, keepdim=True)
    unit = torch.where(norms > 0, W_dec / norms.clamp_min(1e-30), 0.0)
    similar = (unit @ unit.T) > cosine
    similar.fill_diagonal_(False)
    return similar


@torch.no_grad()
def cofiring_totals(
    x: torch.Tensor,
    codes: torch.Tensor,
    reconstruction: torch.Tensor,
    b_dec: torch.Tensor,
    similar: torch.Tensor,
) -> CofiringTotals:
    """:class:`CofiringTotals` of one batch: ``x`` and ``reconstruction`` ``[n, d_in]``,
    ``codes`` ``[n, d_sae]``, ``similar`` from :func:`similar_rows`."""
    fired = (codes != 0).to(torch.float32)
    # Each similar pair is counted from both ends.
    pairs = ((fired @ similar.to(torch.float32)) * fired).sum() / 2
    centred = (x - b_dec).norm(dim=-1)
    ratio = (reconstruction - b_dec).norm(dim=-1) / centred.clamp_min(1e-30)
    return CofiringTotals(
        x.shape[0], float(fired.sum()), float(pairs), float(ratio.sum())
    )


@torch.no_grad()
def measure(
    sae: Any, batches: Iterable[torch.Tensor], cosine: float = 0.5
) -> dict[str, dict[str, float]]:
    """Means of :class:`CofiringTotals` for each encode of ``sae`` (``per_token``,
    and ``batch_rule`` when the SAE has one), each batch encoded as one call."""
    if hasattr(sae, "eval"):
        sae.eval()
    view = batch_rule_view(sae)
    encoders = {"per_token": sae.encode}
    if view is not None:
        encoders["batch_rule"] = view.encode
    similar = similar_rows(sae.W_dec.float(), cosine)
    totals = {name: CofiringTotals() for name in encoders}
    b_dec = sae.b_dec.float()
    for batch in batches:
        x = batch.to(sae.W_dec.device, sae.W_dec.dtype)
        for name, encode in encoders.items():
            codes = encode(x)
            reconstruction = sae.decode(codes)
            totals[name] += cofiring_totals(
                x.float(), codes, reconstruction.float(), b_dec, similar
            )
    return {name: total.means() for name, total in totals.items()}


def study(results_dir: Path, cosine: float = 0.5) -> list[dict[str, Any]]:
    """One row per run and encode: the means over the run's seeds (with std)."""
    results = json.loads((results_dir / "results.json").read_text())
    if results.get("mode") != "activations":
        raise ValueError(
            f"{results_dir}: cofiring reads the eval split of `compare --activations` "
            f"results; this run's mode is {results.get('mode')!r}"
        )
    data = results["data"]
    file = open_activations(data["path"], data["key"])
    ranges: Ranges = [(int(start), int(stop)) for start, stop in data["eval_ranges"]]
    batch_size = int(results["config"]["batch_size"])
    rows = []
    runs = results["config"]["runs"]
    for label, run_dirs in run_directories(results_dir, runs).items():
        per_seed = []
        for path in run_dirs:
            # An unseeded pool is drawn from torch's global generator: seed it, so
            # the batch-rule rows do not change from one call to the next.
            torch.manual_seed(0)
            sae: SAE[Any] = SAE.load_from_disk(str(path))
            batches = read_batches(file, ranges, batch_size)
            per_seed.append(measure(sae, batches, cosine))
        for encode in ENCODES:
            values = [seed[encode] for seed in per_seed if encode in seed]
            if not values:
                continue
            row: dict[str, Any] = {"run": label, "encode": encode, "n": len(values)}
            for key in values[0]:
                series = [v[key] for v in values]
                row[key] = statistics.fmean(series)
                row[key + "_std"] = statistics.stdev(series) if len(series) > 1 else 0.0
            rows.append(row)
    return rows


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    header = (
        "| run | encode | L0 | length ratio | similar pairs |\n|---|---|---|---|---|"
    )
    lines = [header]
    for row in rows:
        cells = [
            f"{row[key]:.3f} ± {row[key + '_std']:.3f}"
            for key in ("l0", "length_ratio", "similar_pairs")
        ]
        lines.append(f"| {row['run']} | {row['encode']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a `compare --activations` output")
    parser.add_argument("--cosine", type=float, default=0.5)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows")
    args = parser.parse_args(argv)
    if not -1.0 <= args.cosine < 1.0:
        parser.error(f"--cosine must be in [-1, 1), got {args.cosine}")
    torch.set_grad_enabled(False)
    rows = study(args.results, args.cosine)
    print(format_rows(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
