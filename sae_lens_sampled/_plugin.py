"""The heavy half of the package: the architectures and their registration.

Importing this module imports SAELens and torch and registers every architecture of
the plugin in SAELens's registries (the package's ``__init__`` and the autoload hook
import it; nothing else needs to). It also installs the flat form of SAELens's
runner config (:mod:`sae_lens_sampled.flat_config`).
"""

from __future__ import annotations

from sae_lens_sampled._registry import Architecture, add_architecture
from sae_lens_sampled.flat_config import install_flat_form
from sae_lens_sampled.saes import feature_choice_sae, mutual_choice_sae, sampled_sae

# One line per architecture; bench and the traffic model list them in this order.
ENTRIES: tuple[Architecture, ...] = (
    mutual_choice_sae.ENTRY,
    sampled_sae.ENTRY,
    feature_choice_sae.ENTRY,
)


def register_all() -> None:
    """Register every architecture and the flat config form; safe to call again."""
    for entry in ENTRIES:
        add_architecture(entry)
    install_flat_form()


register_all()
