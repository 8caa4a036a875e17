"""The flat form of SAELens's runner config (``docs/ecosystem.md``)::

    LanguageModelSAERunnerConfig(architecture="sampled", d_in=768, d_sae=16384, k=64, lr=3e-4)

:func:`install_flat_form` (run when the plugin registers its architectures) teaches
SAELens's own class this form: a call that passes ``architecture=`` becomes the
nested ``sae=`` call; every other call reaches SAELens's ``__init__`` untouched. Each
keyword goes where SAELens's CLI sends the flag of the same name: a runner field to
the runner (so ``device`` and ``dtype`` set the runner's), any other field of the
architecture's training config to that config.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Callable
from typing import Any

from sae_lens import LanguageModelSAERunnerConfig
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.sae import TrainingSAEConfig

# Set on the installed wrapper, so that installing again replaces it.
_MARKER = "_sae_lens_sampled_flat_form"
_CALL = "LanguageModelSAERunnerConfig"

RunnerInit = Callable[..., None]


def init_field_names(cls: type) -> list[str]:
    """Names of the dataclass fields that ``cls.__init__`` takes."""
    return [field.name for field in dataclasses.fields(cls) if field.init]


def training_config_class(architecture: str) -> type[TrainingSAEConfig]:
    """The training config class registered for ``architecture``, or a clear error."""
    if not isinstance(architecture, str) or (
        architecture not in SAE_TRAINING_CLASS_REGISTRY
    ):
        known = ", ".join(sorted(SAE_TRAINING_CLASS_REGISTRY))
        raise ValueError(
            f"{_CALL}(architecture={architecture!r}): not a registered training "
            f"architecture; registered: {known}"
        )
    return SAE_TRAINING_CLASS_REGISTRY[architecture][1]


def _unknown_field_message(
    architecture: str, config_class: type, name: str, known: set[str]
) -> str:
    message = (
        f"{_CALL}(architecture={architecture!r}): {name!r} is neither a field of "
        f"{config_class.__name__} nor of the runner config"
    )
    owners = sorted(
        key
        for key, (_, other) in SAE_TRAINING_CLASS_REGISTRY.items()
        if name in init_field_names(other)
    )
    if owners:
        message += f"; it is a field of {', '.join(owners)}"
    close = difflib.get_close_matches(name, sorted(known), n=1)
    if close:
        message += f"; did you mean {close[0]!r}?"
    return message


def split_flat_kwargs(
    architecture: str, kwargs: dict[str, Any]
) -> tuple[TrainingSAEConfig, dict[str, Any]]:
    """The SAE config and the runner's keyword arguments of a flat call."""
    config_class = training_config_class(architecture)
    runner_names = set(init_field_names(LanguageModelSAERunnerConfig))
    sae_names = set(init_field_names(config_class))
    known = runner_names | sae_names
    for name in kwargs:
        if name not in known:
            raise TypeError(
                _unknown_field_message(architecture, config_class, name, known)
            )
    sae_kwargs = {
        name: value for name, value in kwargs.items() if name not in runner_names
    }
    missing = [
        field.name
        for field in dataclasses.fields(config_class)
        if field.init
        and field.name not in sae_kwargs
        and field.default is dataclasses.MISSING
        and field.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise TypeError(
            f"{_CALL}(architecture={architecture!r}) needs {', '.join(missing)} "
            f"(fields of {config_class.__name__} without a default)"
        )
    runner_kwargs = {
        name: value for name, value in kwargs.items() if name in runner_names
    }
    return config_class(**sae_kwargs), runner_kwargs


def _flat_init(original: RunnerInit) -> RunnerInit:
    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if "architecture" not in kwargs:
            original(self, *args, **kwargs)
            return
        architecture = kwargs.pop("architecture")
        if args or "sae" in kwargs:
            raise TypeError(
                f"{_CALL} takes either sae=<a training SAE config> or "
                f"architecture={architecture!r} with the SAE's fields, not both"
            )
        sae, runner_kwargs = split_flat_kwargs(architecture, kwargs)
        original(self, sae=sae, **runner_kwargs)

    setattr(__init__, _MARKER, True)
    return __init__


def flat_form_installed() -> bool:
    init = LanguageModelSAERunnerConfig.__dict__["__init__"]
    return bool(getattr(init, _MARKER, False))


def install_flat_form() -> None:
    """Let ``LanguageModelSAERunnerConfig`` take ``architecture=`` (idempotent).

    Steps aside if SAELens's class has an ``architecture`` field of its own.
    """
    cls = LanguageModelSAERunnerConfig
    if "architecture" in init_field_names(cls):
        return
    current = cls.__dict__["__init__"]
    original = current.__wrapped__ if getattr(current, _MARKER, False) else current
    cls.__init__ = _flat_init(original)  # type: ignore[method-assign]
