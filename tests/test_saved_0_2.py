"""Files saved by sae-lens-sampled 0.2 (``tests/data/saved_0_2``) load bit-exactly.

``write_files.py`` there wrote them with the 0.2 code: per architecture a training
checkpoint (``training/``), the inference SAE exported from it (``inference/``) and
what both gave, loaded back by 0.2, on a fixed input (``outputs.safetensors``).
"""

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE, TrainingSAE
from safetensors.torch import load_file

from sae_lens_sampled.saes.base import buffer_from_bytes

SAVED = Path(__file__).parent / "data" / "saved_0_2"
ARCHITECTURES = ("sampled", "feature_choice", "mutual_choice")
KINDS = {"training": TrainingSAE, "inference": SAE}


def fixed_input() -> torch.Tensor:
    # The input write_files.py recorded the outputs on.
    return torch.randn(6, 4, generator=torch.Generator().manual_seed(1))


def load(architecture: str, kind: str) -> Any:
    sae = KINDS[kind].load_from_disk(SAVED / architecture / kind)
    return sae.eval() if kind == "training" else sae


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_0_2_file_loads_with_every_tensor_and_field_as_saved(architecture, kind):
    folder = SAVED / architecture / kind
    sae = load(architecture, kind)
    saved = load_file(folder / "sae_weights.safetensors")
    state = sae.state_dict()
    assert set(saved) <= set(state)
    for name, tensor in saved.items():
        ours = state[name]
        if tensor.shape != ours.shape:  # a float64 buffer stored as bytes
            tensor = buffer_from_bytes(tensor, ours)
        assert ours.dtype == tensor.dtype, name
        assert torch.equal(ours, tensor), name
    # Buffers the file lacks (rank_scale of an inference SAE) hold their fresh value.
    fresh = type(sae)(sae.cfg).state_dict()
    for name in set(state) - set(saved):
        assert torch.equal(state[name], fresh[name]), name
    fields = json.loads((folder / "cfg.json").read_text())
    metadata = fields.pop("metadata")
    fields.pop("architecture")
    assert sae.cfg.architecture() == architecture
    for name, value in fields.items():
        assert getattr(sae.cfg, name) == value, name
    for name, value in metadata.items():
        assert getattr(sae.cfg.metadata, name) == value, name


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_0_2_sampled_file_keeps_its_pool_factor_and_no_pool_fraction(kind):
    sae = load("sampled", kind)
    assert sae.cfg.pool_factor == 2
    assert sae.cfg.pool_fraction is None


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_0_2_file_encodes_as_0_2_did(architecture, kind):
    recorded = load_file(SAVED / architecture / "outputs.safetensors")
    sae = load(architecture, kind)
    x = fixed_input()
    with torch.no_grad():
        encoded = sae.encode(x)
        batch = sae.encode_batch(x)
    assert torch.equal(encoded, recorded[f"{kind}.encode"])
    assert torch.equal(batch, recorded[f"{kind}.encode_batch"])
    # The batch rule selects fewer codes than the per-token thresholds here, so the
    # two recorded outputs check different paths.
    assert (batch != 0).sum() < (encoded != 0).sum()
