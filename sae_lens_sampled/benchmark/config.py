"""Settings of ``compare``, shared by every data source."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sae_lens_sampled.benchmark.specs import DEFAULT_RUNS, RunSpec
from sae_lens_sampled.checks import check_choice, check_range

# SAELens's ``normalize_activations`` options (TrainingSAEConfig).
NORMALIZE_OPTIONS: tuple[str, ...] = (
    "none",
    "expected_average_only_in",
    "constant_norm_rescale",
    "layer_norm",
    "covariance_whitening",
)

# Synthetic data sets (``synthetic.SYNTHETIC_DATA``), named here to keep this module
# free of SAELens's synthetic package.
SYNTHETIC_DATA_NAMES: tuple[str, ...] = ("default", "lottery")

# Eval samples in synthetic and language-model mode; in activations mode the default
# is a tenth of the file's rows, at most this many.
DEFAULT_EVAL_SAMPLES = 65_536


@dataclass
class CompareConfig:
    """Settings of a comparison (``docs/compare.md`` describes the modes).

    Args:
        runs (list[RunSpec]): Architectures and their settings (default:
            :data:`~sae_lens_sampled.benchmark.specs.DEFAULT_RUNS`).
        k (float): Mean active features per token, shared by every run (whole number
            when ``topk`` is in the set).
        d_sae (int): Number of SAE features.
        steps (int): Training steps per run.
        batch_size (int): Training batch size in tokens; batch-rule evals use it
            too, so their budget matches training.
        lr (float): Adam learning rate (the last fifth of training decays it 10x).
        seed (int): First seed. Seed ``s`` drives the data (synthetic model, eval
            samples, shuffling of an activations file), the initialisation and the
            Sampled-SAE pool draws (torch's global RNG, set at each run's start).
        seeds (int): Every run is repeated with seeds ``seed`` to ``seed + seeds -
            1``; the summary reports mean and standard deviation over them.
        eval_samples (int | None): Tokens per evaluation. None: 65,536, or in
            activations mode a tenth of the file's rows (at most 65,536).
        calibrate (bool): Also measure every plugin run per token after
            ``calibrate_thresholds`` on held-out samples (synthetic mode only;
            ``*_calibrated`` columns). Off by default: the thresholds learned in
            training already match the batch rule's firing rates.
        output (str | None): Directory for results.json, table.md, table.csv,
            plots and the trained inference SAEs (``saes/``); None writes nothing.
            One that already holds files needs ``resume`` or ``overwrite``.
        resume (bool): Keep the runs (label and seed) already in ``output``'s
            results.json instead of retraining them; its settings must match these
            (except runs, seeds, output, plots, device and threads).
        overwrite (bool): Delete what an earlier comparison wrote in ``output``
            (results, tables, plots, ``saes/``) before starting.
        plots (bool): Write PNG plots (needs matplotlib, the ``plot`` extra).
        device (str): Torch device.
        threads (int | None): CPU threads for torch; None uses 1 in synthetic and
            activations mode (the SAEs are too small to gain from more, and spare
            threads spin when the cores are shared) and torch's setting in
            language-model mode.
        dead_feature_window (int): SAELens trainer setting: a feature not selected
            for this many steps is dead for the aux-k loss.
        normalize_activations (str): SAELens's ``normalize_activations`` for every
            run (:data:`NORMALIZE_OPTIONS`); a run spec may override it.
        data (str): Synthetic mode's data set: ``default`` or ``lottery`` (the
            rarest features far stronger than the frequent ones).
        activations (str | None): Activations mode: a directory written by
            SAELens's ``CacheActivationsRunner`` or a tensor file ``[n_tokens,
            d_in]`` (``.npy``, ``.safetensors``, ``.pt``).
        model (str | None): Language-model mode: a SAELens/TransformerLens model
            name (e.g. ``pythia-160m``); None uses the synthetic default.
        hook (str | None): Language-model mode: the hook name (e.g.
            ``blocks.6.hook_resid_post``). Activations mode: the column of a cached
            dataset, or the tensor's name in a file holding several.
        model_class_name (str): SAELens ``model_class_name``.
        dataset (str): Hugging Face dataset for language-model mode.
        context_size (int | None): Tokens per prompt (None: min(128, model n_ctx)).
        lm_settings (dict[str, Any]): Further ``LanguageModelSAERunnerConfig`` fields.
        labels (str | None): Activations mode: sparse probing of every trained SAE
            on these labels, one integer per activation row (``PATH`` or
            ``PATH:NAME,...``, see :mod:`~sae_lens_sampled.benchmark.probing`).
        groups (str | None): With ``labels``: a group id per row (``PATH`` or
            ``PATH:NAME``); rows are mean-pooled into groups before probing.
    """

    runs: list[RunSpec] = field(default_factory=lambda: copy.deepcopy([*DEFAULT_RUNS]))
    k: float = 6
    d_sae: int = 256
    steps: int = 1500
    batch_size: int = 1024
    lr: float = 3e-3
    seed: int = 0
    seeds: int = 1
    eval_samples: int | None = None
    calibrate: bool = False
    output: str | None = "compare-results"
    resume: bool = False
    overwrite: bool = False
    plots: bool = True
    device: str = "cpu"
    threads: int | None = None
    dead_feature_window: int = 100
    normalize_activations: str = "none"
    data: str = "default"
    activations: str | None = None
    model: str | None = None
    hook: str | None = None
    model_class_name: str = "HookedTransformer"
    dataset: str = "monology/pile-uncopyrighted"
    context_size: int | None = None
    lm_settings: dict[str, Any] = field(default_factory=dict)
    labels: str | None = None
    groups: str | None = None

    def __post_init__(self) -> None:
        check_range("k", self.k, low=0, high=self.d_sae, low_inclusive=False)
        check_range("lr", self.lr, low=0, low_inclusive=False)
        check_range("seed", self.seed, low=0)
        for name in ("d_sae", "steps", "batch_size", "seeds", "dead_feature_window"):
            check_range(name, getattr(self, name), low=1)
        for name in ("eval_samples", "threads", "context_size"):
            value = getattr(self, name)
            if value is not None:  # None: the mode's default
                check_range(name, value, low=1)
        check_choice(
            "normalize_activations", self.normalize_activations, NORMALIZE_OPTIONS
        )
        if self.data not in SYNTHETIC_DATA_NAMES:
            raise ValueError(
                f"data must be one of {', '.join(SYNTHETIC_DATA_NAMES)}; got "
                f"{self.data!r}"
            )
        if self.data != "default" and (
            self.model is not None or self.activations is not None
        ):
            raise ValueError(
                f"data={self.data!r} names a synthetic data set; it cannot be "
                "combined with model or activations"
            )
        if self.model is not None and self.activations is not None:
            raise ValueError(
                "model and activations are exclusive (language-model mode or "
                f"activations mode), got model={self.model!r} and "
                f"activations={self.activations!r}"
            )
        if self.labels is not None and self.activations is None:
            raise ValueError(
                f"labels={self.labels!r} needs activations: the labels name the rows "
                "of an activations file"
            )
        if self.groups is not None and self.labels is None:
            raise ValueError(f"groups={self.groups!r} needs labels, got None")
        if self.resume and self.overwrite:
            raise ValueError(
                "resume and overwrite are exclusive: resume keeps the runs in "
                "output, overwrite deletes them"
            )
        if self.model is not None and self.hook is None:
            raise ValueError(f"hook must be set with model={self.model!r}, got None")

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seed, self.seed + self.seeds))

    def to_dict(self) -> dict[str, Any]:
        settings = dataclasses.asdict(self)
        settings["runs"] = [spec.label for spec in self.runs]
        return settings
