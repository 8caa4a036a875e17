import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import sae_lens_sampled  # noqa: E402,F401  (registers the plugin architectures)


@pytest.fixture(autouse=True)
def _seed_and_grad():
    torch.manual_seed(0)
    torch.set_grad_enabled(True)
    yield
