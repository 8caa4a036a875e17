"""Run specifications for ``compare``: which architectures, with which settings.

A spec is an architecture key from SAELens's training registry plus config fields,
written ``sampled:pool_factor=4,score=entropy``. In a comma-separated list, an item
holding ``=`` but no ``:`` continues the previous spec's settings, so
``topk,sampled:pool_factor=4,score=entropy,mutual_choice`` is three runs.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sae_lens_sampled  # noqa: F401  (registers the plugin architectures)

if TYPE_CHECKING:
    from sae_lens.saes.sae import TrainingSAEConfig

# SAELens's registry is imported by the functions that read it, so that the command
# line can parse and check run specs without importing SAELens.


@dataclass
class RunSpec:
    """One run of the comparison.

    Args:
        architecture (str): Key in SAELens's training registry (``topk``,
            ``batchtopk``, ``sampled``, ``feature_choice``, ``mutual_choice``, ...).
        params (dict[str, Any]): Training-config fields for this run, on top of the
            shared ``d_in``, ``d_sae`` and ``k``.
    """

    architecture: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.params:
            return self.architecture
        settings = ",".join(f"{name}={value}" for name, value in self.params.items())
        return f"{self.architecture}:{settings}"


# The default set: SAELens's per-token and batch top-k, Sampled-SAE at a narrow pool
# (the paper's l = 4), its default pool (half the dictionary) and a wide one (l = 32),
# Feature Choice and Mutual Choice, each at its defaults.
DEFAULT_RUNS: tuple[RunSpec, ...] = (
    RunSpec("topk"),
    RunSpec("batchtopk"),
    RunSpec("sampled", {"pool_factor": 4.0}),
    RunSpec("sampled"),
    RunSpec("sampled", {"pool_factor": 32.0}),
    RunSpec("feature_choice"),
    RunSpec("mutual_choice"),
)


def parse_value(text: str) -> Any:
    """``"4"`` -> 4, ``"1.5"`` -> 1.5, ``"true"`` -> True, ``"none"`` -> None."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_run_specs(text: str) -> list[RunSpec]:
    """Parse ``"topk,sampled:pool_factor=4,score=entropy"`` into run specs;
    ``default`` expands to :data:`DEFAULT_RUNS`."""
    specs: list[RunSpec] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if item == "default":
            specs.extend(copy.deepcopy(DEFAULT_RUNS))
            continue
        head, sep, setting = item.partition(":")
        if not sep and "=" in item:  # a further setting of the previous spec
            if not specs:
                raise ValueError(
                    f"architectures: setting {item!r} comes before any architecture"
                )
            spec, setting = specs[-1], item
        else:
            spec = RunSpec(head.strip())
            specs.append(spec)
        if setting:
            name, eq, value = setting.partition("=")
            if not eq or not name.strip():
                raise ValueError(
                    f"architectures: expected NAME=VALUE after "
                    f"{spec.architecture!r}, got {setting!r}"
                )
            spec.params[name.strip()] = parse_value(value)
    if not specs:
        raise ValueError(f"architectures: no architecture in {text!r}")
    return specs


def resolve_runs(specs: list[RunSpec]) -> tuple[list[RunSpec], list[str]]:
    """The runs to do and a note for each skipped one: a plugin architecture missing
    from SAELens's registry is skipped; an unknown key is refused."""
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    from sae_lens_sampled._registry import architecture_keys

    optional = architecture_keys()
    runs: list[RunSpec] = []
    notes: list[str] = []
    for spec in specs:
        if spec.architecture in SAE_TRAINING_CLASS_REGISTRY:
            runs.append(spec)
        elif spec.architecture in optional:
            notes.append(
                f"skipped {spec.label}: architecture {spec.architecture!r} is not "
                "registered in this installation"
            )
        else:
            known = ", ".join(sorted(SAE_TRAINING_CLASS_REGISTRY))
            raise ValueError(
                f"architectures: unknown architecture {spec.architecture!r}; "
                f"registered: {known}"
            )
    if not runs:
        raise ValueError("architectures: nothing left to run")
    return runs, notes


def _accepts_none(cfg_class: type, name: str) -> bool:
    hint = typing.get_type_hints(cfg_class).get(name)
    return hint is None or hint is type(None) or type(None) in typing.get_args(hint)


def build_sae_config(
    spec: RunSpec,
    *,
    d_in: int,
    d_sae: int,
    k: float,
    normalize_activations: str = "none",
) -> TrainingSAEConfig:
    """The training config of ``spec`` at the shared ``d_in``, ``d_sae``, ``k`` and
    ``normalize_activations``; the spec's own settings override them."""
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    cfg_class = SAE_TRAINING_CLASS_REGISTRY[spec.architecture][1]
    names = {f.name for f in dataclasses.fields(cfg_class)}
    unknown = sorted(set(spec.params) - names)
    if unknown:
        raise ValueError(
            f"architectures: {spec.architecture!r} has no setting {unknown[0]!r}; "
            f"allowed: {', '.join(sorted(names - {'metadata'}))}"
        )
    settings: dict[str, Any] = {"d_in": d_in, "d_sae": d_sae}
    if normalize_activations != "none":
        settings["normalize_activations"] = normalize_activations
    if "k" in names:
        whole = typing.get_type_hints(cfg_class).get("k") is int
        if whole and k != int(k):
            raise ValueError(
                f"k must be a whole number for {spec.architecture!r}, got {k!r}"
            )
        settings["k"] = int(k) if whole else float(k)
    for name, value in spec.params.items():
        # parse_value reads ``none`` as None; a field that takes no None gets the
        # string (``aux_loss=none``).
        none_text = value is None and not _accepts_none(cfg_class, name)
        settings[name] = "none" if none_text else value
    return cfg_class(**settings)
