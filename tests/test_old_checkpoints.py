"""Training checkpoints written by sae-lens-sampled 0.1 (``tests/data/checkpoints_0_1``).

The files were saved with ``save_model`` by the 0.1 training SAEs (d_in 4, d_sae 8,
k 2, three training steps each); 0.1 had no ``selection_rate``, ``token_rate`` or
``tail_scale`` (nor ``sampled``'s ``pool_staleness`` and ``missed_chances``).
"""

from pathlib import Path

import pytest
import torch
from sae_lens import TrainingSAE
from safetensors.torch import load_file, save_file

from sae_lens_sampled.saes.base import buffer_from_bytes
from tests.helpers import step_input

CHECKPOINTS = Path(__file__).parent / "data" / "checkpoints_0_1"
MISSING = {
    "mutual_choice": ["selection_rate", "token_rate", "tail_scale"],
    "feature_choice": ["selection_rate", "token_rate", "tail_scale"],
    "sampled": [
        "selection_rate",
        "token_rate",
        "tail_scale",
        "pool_staleness",
        "missed_chances",
    ],
}
WARNING = r"sampled 0\.1 \(it has no selection_rate, token_rate, tail_scale\)"


def saved_buffer(path: Path, name: str, like: torch.Tensor) -> torch.Tensor:
    saved = load_file(path / "sae_weights.safetensors")[name]
    return buffer_from_bytes(saved, like) if saved.shape != like.shape else saved


@pytest.mark.parametrize("architecture", sorted(MISSING))
def test_a_0_1_checkpoint_loads_with_fresh_new_buffers_and_a_warning(architecture):
    path = CHECKPOINTS / architecture
    with pytest.warns(UserWarning, match=WARNING) as record:
        sae = TrainingSAE.load_from_disk(path)
    message = str(record[0].message)
    assert f"loaded with {', '.join(MISSING[architecture])} as a fresh" in message
    fresh = type(sae)(sae.cfg)
    for name in MISSING[architecture]:
        assert torch.equal(getattr(sae, name), getattr(fresh, name)), name
        assert getattr(sae, name).dtype == getattr(fresh, name).dtype
    # What the file holds is kept, bit for bit.
    for name in ("running_threshold", "firing_rate", "n_tokens_seen"):
        buffer = getattr(sae, name)
        assert torch.equal(buffer, saved_buffer(path, name, buffer)), name
    assert torch.isfinite(sae.running_threshold).any()
    assert torch.equal(sae.W_enc, load_file(path / "sae_weights.safetensors")["W_enc"])
    # Training goes on from it.
    sae.training_forward_pass(step_input(torch.randn(16, 4)))
    assert sae.selection_rate.sum() > 0


def test_the_resume_path_loads_a_0_1_checkpoint_too():
    path = CHECKPOINTS / "sampled"
    with pytest.warns(UserWarning, match=WARNING):
        sae = TrainingSAE.load_from_disk(path)
    resumed = type(sae)(sae.cfg)
    with pytest.warns(UserWarning, match=WARNING):
        resumed.load_weights_from_checkpoint(path)
    for name, value in sae.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_a_checkpoint_missing_only_some_new_buffers_is_still_an_error(tmp_path):
    # Only a 0.1 file (none of the three) is filled in; a damaged file is not.
    source = CHECKPOINTS / "mutual_choice"
    state = load_file(source / "sae_weights.safetensors")
    state["selection_rate"] = torch.zeros(8, dtype=torch.float64).view(torch.uint8)
    (tmp_path / "cfg.json").write_text((source / "cfg.json").read_text())
    save_file(state, tmp_path / "sae_weights.safetensors")
    with pytest.raises(RuntimeError, match=r'Missing key\(s\).*"token_rate"'):
        TrainingSAE.load_from_disk(tmp_path)
