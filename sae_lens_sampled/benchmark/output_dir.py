"""``compare``'s output directory: one comparison per directory, resumable.

A directory that already holds files is refused unless the comparison resumes the
one written there (``resume``: runs whose label, seed and settings match are kept,
not retrained) or replaces it (``overwrite``: what ``compare`` wrote there is
deleted first). Free of torch and SAELens, so the command line checks it at once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

RESULTS_FILENAME = "results.json"
SAES_DIRNAME = "saes"
TABLE_MARKDOWN = "table.md"
TABLE_CSV = "table.csv"
TRADEOFF_PLOT = "ev_vs_l0.png"
MCC_PLOT = "mcc.png"
# Files compare writes beside results.json.
WRITTEN_FILES = (RESULTS_FILENAME, TABLE_MARKDOWN, TABLE_CSV, TRADEOFF_PLOT, MCC_PLOT)
WRITTEN_PATTERNS = ("spectrum_*.png",)

# Settings that may differ between a comparison and its resumption: which runs and
# seeds, where and how results are written, and where training runs.
FREE_SETTINGS = frozenset(
    {"runs", "seed", "seeds", "output", "plots", "resume", "overwrite", "threads"}
    | {"device"}
)


def check_output(output: str | None, *, resume: bool, overwrite: bool) -> None:
    """Refuse a non-empty ``output`` unless ``resume`` or ``overwrite``."""
    if output is None:
        return
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output: {output!r} is a file, not a directory")
    if not path.is_dir() or not any(path.iterdir()) or resume or overwrite:
        return
    raise ValueError(
        f"output: {output!r} already holds files; pass --resume (resume=True) to "
        "continue the comparison written there, --overwrite (overwrite=True) to "
        "replace it, or another --output"
    )


def clear_output(output: str) -> None:
    """Delete what a comparison writes in ``output`` (``overwrite``); other files
    stay."""
    path = Path(output)
    shutil.rmtree(path / SAES_DIRNAME, ignore_errors=True)
    for name in WRITTEN_FILES:
        (path / name).unlink(missing_ok=True)
    for pattern in WRITTEN_PATTERNS:
        for written in path.glob(pattern):
            written.unlink()


def _shared(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in FREE_SETTINGS}


def finished_runs(
    output: str | None, settings: dict[str, Any]
) -> dict[tuple[str, int], dict[str, Any]]:
    """Results of ``output/results.json`` by (label, seed), if its settings match
    ``settings`` (CompareConfig.to_dict()); none without a results.json.

    Raises ValueError naming the first setting that differs.
    """
    if output is None:
        return {}
    path = Path(output) / RESULTS_FILENAME
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
        saved_settings, results = saved["config"], saved["results"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"resume: {path} is not a results.json written by compare ({error}); "
            "pass --overwrite to replace it"
        ) from None
    # Compared as JSON reads them back (tuples as lists).
    ours = json.loads(json.dumps(_shared(settings)))
    theirs = _shared(saved_settings)
    for name in sorted(ours.keys() | theirs.keys()):
        if ours.get(name) != theirs.get(name):
            raise ValueError(
                f"resume: {path} was written with {name}={theirs.get(name)!r}, this "
                f"comparison has {name}={ours.get(name)!r}; use the same settings, "
                "--overwrite, or another --output"
            )
    return {(r["label"], r["seed"]): r for r in results}
