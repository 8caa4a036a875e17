"""What every ``compare`` run shares: inference export, batch-rule view, result base."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE, TrainingSAE
from sae_lens.saes.batchtopk_sae import BatchTopK

from sae_lens_sampled.benchmark.specs import RunSpec


def to_inference_sae(sae: TrainingSAE[Any]) -> SAE[Any]:
    """The inference SAE that ``save_inference_model`` would write, in memory."""
    state = {name: value.detach().clone() for name, value in sae.state_dict().items()}
    sae.process_state_dict_for_saving_inference(state)
    inference: SAE[Any] = SAE.from_dict(sae.cfg.get_inference_sae_cfg_dict())
    inference.load_state_dict(state)
    return inference.to(sae.W_dec.device)


class BatchRuleView:
    """An SAE whose ``encode`` is the batch rule; everything else is the SAE's own.

    Lets SAELens's evaluators, which call ``sae.encode``, measure the batch rule.
    """

    def __init__(self, sae: SAE[Any], encode: Callable[..., torch.Tensor]):
        self._sae = sae
        self.encode = encode

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sae, name)


def batch_rule_view(sae: TrainingSAE[Any]) -> BatchRuleView | None:
    """A view applying ``sae``'s batch rule, or None for per-token architectures."""
    encode_batch = getattr(sae, "encode_batch", None)  # the plugin's architectures
    if encode_batch is not None:
        return BatchRuleView(sae, encode_batch)
    if isinstance(sae.activation_fn, BatchTopK):
        # SAELens's BatchTopK training SAEs select over the batch in any mode.
        return BatchRuleView(sae, sae.encode)
    return None


def run_dir_name(index: int, spec: RunSpec) -> str:
    return f"{index:02d}_" + re.sub(r"[^A-Za-z0-9.]+", "_", spec.label).strip("_")


@contextmanager
def quiet_sae_lens() -> Iterator[None]:
    """Hide SAELens's per-run warnings about overridden models and datasets."""
    sae_lens_logger = logging.getLogger("sae_lens")
    level = sae_lens_logger.level
    sae_lens_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        sae_lens_logger.setLevel(level)


def base_result(
    spec: RunSpec, sae: TrainingSAE[Any], tokens: int, seconds: float
) -> dict[str, Any]:
    params = dict(spec.params)
    for name in ("k", "d_sae"):
        if hasattr(sae.cfg, name):
            params.setdefault(name, getattr(sae.cfg, name))
    metadata = sae.cfg.metadata
    return {
        "architecture": spec.architecture,
        "label": spec.label,
        "params": params,
        "training_tokens": tokens,
        "train_seconds": seconds,
        "tokens_per_second": tokens / max(seconds, 1e-9),
        # The trainer's view at the end of training (training rule): mean L0 and
        # the features not selected in the last dead_feature_window steps.
        "l0_train": getattr(metadata, "l0", None),
        "dead_features_train": getattr(metadata, "num_dead_features", None),
    }


def run_directories(results_dir: Path, labels: Sequence[str]) -> dict[str, list[Path]]:
    """Saved SAEs of a ``compare`` output, by run label, one per seed; ``labels`` are
    the runs in order (``results.json``'s ``config.runs``)."""
    saes = results_dir / "saes"
    if not saes.is_dir():
        raise ValueError(f"{results_dir}: no saved SAEs (run compare with --output)")
    # One seed saves its runs in saes/ itself, several in saes/seed<N>/.
    seed_dirs = sorted(saes.glob("seed*")) or [saes]
    by_label: dict[str, list[Path]] = {}
    for seed_dir in seed_dirs:
        for run_dir in sorted(seed_dir.iterdir()):
            index = int(run_dir.name.split("_", 1)[0]) - 1
            by_label.setdefault(labels[index], []).append(run_dir)
    return by_label
