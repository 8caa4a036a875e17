"""The precision contract of a saved SAE trained with ``rescale_acts_by_decoder_norm``.

The export folds the decoder norms into the encoder (``W_enc * ||W_dec||``,
``b_enc * ||W_dec||``) in the SAE's dtype, so the saved SAE computes the training
ranking values with other roundings. ``docs/reliability.md`` states the bound; these
tests hold the saved SAE to it, and to its consequences for the batch rule and the
per-token rule, on the setup whose measured mismatch the docs quote.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE

from sae_lens_sampled import (
    FeatureChoiceTrainingSAE,
    FeatureChoiceTrainingSAEConfig,
    MutualChoiceTrainingSAE,
    MutualChoiceTrainingSAEConfig,
    SampledTrainingSAE,
    SampledTrainingSAEConfig,
)
from tests.helpers import step_input

D_IN, D_SAE, K, N_TOKENS = 64, 512, 16, 1024
# Unit roundoff of each dtype: half the distance from 1 to the next value.
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
ARCHITECTURES: dict[str, tuple[Any, Any, dict[str, Any]]] = {
    "mutual_choice": (MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig, {}),
    "sampled": (
        SampledTrainingSAE,
        SampledTrainingSAEConfig,
        {"pool_mode": "top", "pool_factor": 4},
    ),
    "feature_choice": (FeatureChoiceTrainingSAE, FeatureChoiceTrainingSAEConfig, {}),
}


def trained(architecture: str, dtype: str) -> Any:
    """Five training steps; decoder norms spread over 1 to 100, as after training."""
    sae_class, cfg_class, fields = ARCHITECTURES[architecture]
    torch.manual_seed(0)
    cfg = cfg_class(d_in=D_IN, d_sae=D_SAE, k=K, dtype=dtype, aux_loss="none", **fields)
    sae = sae_class(cfg)
    with torch.no_grad():
        norms = torch.logspace(-1, 1, D_SAE)[torch.randperm(D_SAE)] * 10
        sae.W_dec.mul_(norms.to(sae.W_dec.dtype)[:, None])
        sae.b_enc.normal_(0, 0.1)
    for _ in range(5):
        sae.training_forward_pass(
            step_input(torch.randn(256, D_IN).to(sae.W_enc.dtype))
        )
    return sae.eval()


@functools.cache
def compare(architecture: str, dtype: str) -> dict[str, torch.Tensor]:
    """Training's and the saved SAE's values and selections on the same tokens."""
    sae = trained(architecture, dtype)
    x = torch.randn(N_TOKENS, D_IN).to(sae.W_enc.dtype)
    with tempfile.TemporaryDirectory() as folder:
        sae.save_inference_model(folder)
        saved = SAE.load_from_disk(folder, dtype=dtype)
    assert saved.cfg.dtype == dtype
    with torch.no_grad():
        sae_in = (x - sae.b_dec).double()
        magnitude = sae_in.abs() @ sae.W_enc.double().abs() + sae.b_enc.double().abs()
        return {
            "training_pre": sae.hidden_pre(x).double(),
            "saved_pre": (saved.hidden_pre(x) * saved.rank_scale).double(),
            "bound": 2
            * (D_IN + 3)
            * UNIT_ROUNDOFF[dtype]
            * sae.W_dec.double().norm(dim=-1)
            * magnitude,
            "training_batch": sae.encode_batch(x) != 0,
            "saved_batch": saved.encode_batch(x) != 0,
            "training_token": sae.encode(x) != 0,
            "saved_token": saved.encode(x) != 0,
            "threshold": saved.threshold.double(),
        }


@pytest.mark.parametrize("dtype", sorted(UNIT_ROUNDOFF))
def test_saved_values_within_the_stated_bound(dtype):
    got = compare("mutual_choice", dtype)
    error = (got["saved_pre"] - got["training_pre"]).abs()
    assert bool((error <= got["bound"]).all())
    assert bool((error > 0).any())  # the fold does round


@pytest.mark.parametrize("dtype", sorted(UNIT_ROUNDOFF))
def test_selections_differ_only_within_the_bound_of_the_boundary(dtype):
    got = compare("mutual_choice", dtype)
    values = got["training_pre"].relu()
    selected = got["training_batch"]
    boundary = values[selected].min()  # mutual_choice: one global boundary
    flipped = selected != got["saved_batch"]
    allowed = got["bound"] + got["bound"].max()
    assert bool(((values - boundary).abs() <= allowed)[flipped].all())
    # the per-token rule compares with the same (rounded) thresholds
    token_flipped = got["training_token"] != got["saved_token"]
    gap = (got["training_pre"] - got["threshold"]).abs()
    assert bool((gap <= got["bound"])[token_flipped].all())


# Selected entries (of 16,384) and per-token firings on which the saved SAE and
# training disagree, as measured (CPU) and quoted in docs/reliability.md; other
# machines round alike but may order sums differently, so twice these is allowed.
MEASURED = {
    ("float32", "mutual_choice"): (0, 0),
    ("float32", "sampled"): (0, 0),
    ("float32", "feature_choice"): (0, 0),
    ("float16", "mutual_choice"): (10, 7),
    ("float16", "sampled"): (8, 9),
    ("float16", "feature_choice"): (17, 23),
    ("bfloat16", "mutual_choice"): (76, 66),
    ("bfloat16", "sampled"): (48, 55),
    ("bfloat16", "feature_choice"): (180, 169),
}


@pytest.mark.parametrize(("dtype", "architecture"), sorted(MEASURED))
def test_measured_mismatch(dtype, architecture):
    got = compare(architecture, dtype)
    batch = int((got["training_batch"] != got["saved_batch"]).sum())
    token = int((got["training_token"] != got["saved_token"]).sum())
    most_batch, most_token = MEASURED[dtype, architecture]
    assert batch <= 2 * most_batch and token <= 2 * most_token
    if dtype == "bfloat16":  # the mismatch is real, not a broken comparison
        assert batch > 0 and token > 0


def test_docs_state_the_contract_and_the_measured_mismatch():
    root = Path(__file__).parent.parent
    docs = (root / "docs" / "reliability.md").read_text()
    assert (
        "delta_ij = 2 (d_in + 3) u n_j (|x_i - b_dec| @ |W_enc[:, j]| + |b_enc[j]|)"
        in (docs)
    )
    for dtype in ("float32", "float16", "bfloat16"):
        cells = [
            "{} / {}".format(*MEASURED[dtype, architecture])
            for architecture in ("mutual_choice", "sampled", "feature_choice")
        ]
        assert f"| {dtype} | {' | '.join(cells)} |" in docs
    changelog = (root / "CHANGELOG.md").read_text()
    assert "selects exactly what training selected for every config" not in changelog
