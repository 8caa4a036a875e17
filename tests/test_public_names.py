"""The package's public names: found at run time from the architecture modules' file
names, and written out for type checkers; the two must agree."""

from __future__ import annotations

import ast
from pathlib import Path

import sae_lens_sampled
from sae_lens_sampled._registry import architectures

INIT = Path(sae_lens_sampled.__file__)


def type_checking_imports() -> set[str]:
    """The names ``__init__.py`` imports under ``if TYPE_CHECKING:``."""
    tree = ast.parse(INIT.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for statement in node.body:
                if isinstance(statement, ast.ImportFrom):
                    names.update(alias.name for alias in statement.names)
    return names


def test_every_architecture_class_is_public_from_its_module():
    lazy = sae_lens_sampled._LAZY
    for entry in architectures():
        classes = (
            entry.sae_class,
            entry.sae_config_class,
            entry.training_sae_class,
            entry.training_config_class,
        )
        for cls in classes:
            assert lazy[cls.__name__] == cls.__module__, cls
            assert getattr(sae_lens_sampled, cls.__name__) is cls


def test_names_from_file_names_by_hand():
    names = sae_lens_sampled._architecture_names()
    assert names["FeatureChoiceTrainingSAEConfig"] == (
        "sae_lens_sampled.saes.feature_choice_sae"
    )
    assert names["SampledSAE"] == "sae_lens_sampled.saes.sampled_sae"
    assert len(names) == 4 * len(architectures())


def test_type_checkers_see_the_same_names():
    assert type_checking_imports() == set(sae_lens_sampled._LAZY)
    assert sae_lens_sampled.__all__ == sorted([*sae_lens_sampled._LAZY, "__version__"])
