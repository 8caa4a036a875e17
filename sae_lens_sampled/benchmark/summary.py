"""Seeds and spectra: per-run summaries over seeds, and the runs that form a
spectrum along one numeric setting (e.g. Sampled-SAE's ``pool_factor``)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sae_lens_sampled.benchmark.metrics import SUMMARY_METRICS


def summarize(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per run label, in order of first appearance.

    Each holds ``label``, ``architecture``, ``params``, ``n_seeds``, ``seeds`` and,
    for every metric of ``SUMMARY_METRICS``, ``<metric>_mean`` and ``<metric>_std``
    (sample standard deviation) over the seeds where the metric is defined: the
    mean is None when no seed defines it, the std when fewer than two do.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        groups.setdefault(result["label"], []).append(result)
    summary = []
    for label, rows in groups.items():
        entry: dict[str, Any] = {
            "label": label,
            "architecture": rows[0]["architecture"],
            "params": rows[0]["params"],
            "n_seeds": len(rows),
            "seeds": [row.get("seed") for row in rows],
        }
        if any("health_flags" in row for row in rows):
            flags = [flag for row in rows for flag in row.get("health_flags", [])]
            entry["health_flags"] = merge_seed_flags(flags)
        for name in SUMMARY_METRICS:
            values = [float(row[name]) for row in rows if row.get(name) is not None]
            entry[name + "_mean"] = statistics.fmean(values) if values else None
            entry[name + "_std"] = statistics.stdev(values) if len(values) > 1 else None
        summary.append(entry)
    return summary


def merge_seed_flags(flags: Sequence[str]) -> list[str]:
    """The health flags of one run's seeds, one per problem: the per-token L0 flags
    (``HealthReport.flags``'s ``"L0 +N%"``) as the range of their drifts."""
    l0 = sorted(
        {flag for flag in flags if flag.startswith("L0 ")},
        key=lambda flag: float(flag.removeprefix("L0 ").removesuffix("%")),
    )
    if len(l0) > 1:
        l0 = [f"{l0[0]} to {l0[-1].removeprefix('L0 ')}"]
    others = [flag for flag in dict.fromkeys(flags) if not flag.startswith("L0 ")]
    return others + l0


@dataclass
class SpectrumSeries:
    """Runs of one architecture that differ only in the numeric setting ``field``:
    their summary ``entries``, sorted by ``field``, and the settings they share
    (``fixed``)."""

    architecture: str
    field: str
    fixed: dict[str, Any]
    entries: list[dict[str, Any]]

    @property
    def values(self) -> list[float]:
        return [float(entry["params"][self.field]) for entry in self.entries]

    @property
    def label(self) -> str:
        shared = {k: v for k, v in self.fixed.items() if k not in ("k", "d_sae")}
        if not shared:
            return self.architecture
        settings = ",".join(f"{name}={value}" for name, value in shared.items())
        return f"{self.architecture} ({settings})"


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def spectrum_series(
    summary: Sequence[dict[str, Any]],
) -> dict[str, list[SpectrumSeries]]:
    """Series of at least two runs of one architecture whose settings differ in a
    single numeric field, keyed by that field (e.g. ``pool_factor``)."""
    found: dict[str, list[SpectrumSeries]] = {}
    for architecture in dict.fromkeys(entry["architecture"] for entry in summary):
        entries = [e for e in summary if e["architecture"] == architecture]
        fields = dict.fromkeys(
            name
            for entry in entries
            for name, value in entry["params"].items()
            if _numeric(value)
        )
        for field in fields:
            groups: dict[tuple[tuple[str, str], ...], list[dict[str, Any]]] = {}
            for entry in entries:
                params = entry["params"]
                if not _numeric(params.get(field)):
                    continue
                others = tuple(
                    sorted((k, repr(v)) for k, v in params.items() if k != field)
                )
                groups.setdefault(others, []).append(entry)
            for members in groups.values():
                if len({float(m["params"][field]) for m in members}) < 2:
                    continue
                members = sorted(members, key=lambda m: float(m["params"][field]))
                fixed = {k: v for k, v in members[0]["params"].items() if k != field}
                found.setdefault(field, []).append(
                    SpectrumSeries(architecture, field, fixed, members)
                )
    return found


def reference_entry(
    summary: Sequence[dict[str, Any]], architecture: str = "batchtopk"
) -> dict[str, Any] | None:
    """The first summary entry of ``architecture`` (the spectra's reference line)."""
    return next((e for e in summary if e["architecture"] == architecture), None)
