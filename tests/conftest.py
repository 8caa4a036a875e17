import os

import pytest
import torch
from hypothesis import settings

# CI replays one fixed set of generated examples (derandomize), so a run of `main`
# cannot fail on a draw no one has seen; locally each run explores new examples.
settings.register_profile("ci", derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import sae_lens_sampled  # noqa: E402,F401  (registers the plugin architectures)


@pytest.fixture(autouse=True)
def _seed_and_grad():
    torch.manual_seed(0)
    torch.set_grad_enabled(True)
    yield
