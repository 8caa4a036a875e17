"""Sampled-SAE pool sized as a share of the dictionary (``pool_fraction``)."""

import json

import pytest
import torch
from sae_lens import SAE
from sae_lens.llm_sae_training_runner import _parse_cfg_args

from sae_lens_sampled import SampledTrainingSAE, SampledTrainingSAEConfig
from sae_lens_sampled.saes.sampled_sae import (
    DEFAULT_POOL_FRACTION,
    SampledSAEConfig,
    config_pool_size,
)
from sae_lens_sampled.selection import batch_topk, pool_size, sampled_pool, sampled_topk

# --- pure tensor logic ----------------------------------------------------------------


def test_pool_size_by_hand():
    assert pool_size(4, None, 64, pool_fraction=0.25) == 16
    assert pool_size(4, None, 100, pool_fraction=0.125) == 12  # round(12.5), to even
    assert pool_size(4, 3.0, 64) == 12
    assert pool_size(4, None, 64, pool_fraction=1.0) == 64
    assert pool_size(4, 100.0, 64) == 64  # never more than the dictionary
    with pytest.raises(ValueError, match="pool_factor or pool_fraction"):
        pool_size(4, None, 64)


def test_a_fraction_and_its_factor_draw_the_same_pool():
    acts = torch.rand(32, 40, generator=torch.Generator().manual_seed(0))
    for seed in range(4):
        by_fraction, _ = sampled_pool(
            acts,
            2.0,
            None,
            "squared_l2",
            "sample",
            torch.Generator().manual_seed(seed),
            pool_fraction=0.25,
        )
        by_factor, _ = sampled_pool(
            acts, 2.0, 5.0, "squared_l2", "sample", torch.Generator().manual_seed(seed)
        )
        assert by_fraction is not None and by_factor is not None
        assert by_fraction.numel() == 10
        assert torch.equal(by_fraction, by_factor)


def test_a_whole_dictionary_pool_is_batch_topk():
    acts = torch.rand(16, 12, generator=torch.Generator().manual_seed(1))
    codes = sampled_topk(acts, 3.0, None, "l2", "sample", pool_fraction=1.0)
    assert torch.equal(codes, batch_topk(acts, 48))


# --- config ---------------------------------------------------------------------------


def test_the_default_pool_is_a_share_of_the_dictionary():
    assert DEFAULT_POOL_FRACTION == 0.5
    for d_sae, expected in ((64, 32), (256, 128), (4096, 2048)):
        cfg = SampledTrainingSAEConfig(d_in=8, d_sae=d_sae, k=4)
        # written into the config, so a saved SAE names the pool it was trained with
        assert (cfg.pool_factor, cfg.pool_fraction) == (None, DEFAULT_POOL_FRACTION)
        assert config_pool_size(cfg) == expected


def test_the_default_pool_holds_at_least_k_features():
    cfg = SampledTrainingSAEConfig(d_in=8, d_sae=8, k=6)
    assert cfg.pool_fraction == 0.75
    assert config_pool_size(cfg) == 6


def test_pool_factor_alone_keeps_the_papers_size():
    cfg = SampledTrainingSAEConfig(d_in=8, d_sae=64, k=4, pool_factor=3.0)
    assert (cfg.pool_factor, cfg.pool_fraction, config_pool_size(cfg)) == (
        3.0,
        None,
        12,
    )


@pytest.mark.parametrize("config_class", [SampledTrainingSAEConfig, SampledSAEConfig])
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"pool_factor": 4.0, "pool_fraction": 0.5},
            r"set one of pool_factor .* and pool_fraction .*not both; "
            r"got pool_factor=4.0, pool_fraction=0.5",
        ),
        ({"pool_fraction": 1.5}, r"pool_fraction must be in \(0, 1\], got 1.5"),
        ({"pool_fraction": 0.0}, r"pool_fraction must be in \(0, 1\], got 0.0"),
        ({"pool_fraction": float("nan")}, r"pool_fraction must be in \(0, 1\]"),
        (
            {"pool_fraction": 0.05},
            r"pool_fraction must be in \[k / d_sae, 1\] = \[0.0625, 1\] for k=4 and "
            r"d_sae=64 .*got 0.05",
        ),
        ({"pool_factor": 0.5}, r"pool_factor must be in \[1, inf\), got 0.5"),
    ],
)
def test_bad_pool_sizes_name_the_field(config_class, fields, message):
    with pytest.raises(ValueError, match=message):
        config_class(d_in=8, d_sae=64, k=4, **fields)


def test_cli_takes_pool_fraction_and_refuses_both():
    cfg = _parse_cfg_args(["--architecture", "sampled", "--pool_fraction", "0.5"])
    assert (cfg.sae.pool_fraction, cfg.sae.pool_factor) == (0.5, None)
    cfg = _parse_cfg_args(["--architecture", "sampled", "--pool_factor", "8"])
    assert (cfg.sae.pool_fraction, cfg.sae.pool_factor) == (None, 8.0)
    with pytest.raises(ValueError, match="not both"):
        _parse_cfg_args(
            [
                "--architecture",
                "sampled",
                "--pool_factor",
                "8",
                "--pool_fraction",
                "0.5",
            ]
        )


# --- save and load --------------------------------------------------------------------


def trained_sae(**fields) -> SampledTrainingSAE:
    settings = {"k": 2, "pool_seed": 0, "aux_loss": "none"}
    cfg = SampledTrainingSAEConfig(d_in=8, d_sae=32, **{**settings, **fields})
    sae = SampledTrainingSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(8, 32, generator=torch.Generator().manual_seed(0)))
        sae.b_enc.fill_(0.5)
    return sae


def test_pool_fraction_saves_and_loads_and_selects_the_same(tmp_path):
    sae = trained_sae(pool_fraction=0.375)
    x = torch.randn(24, 8, generator=torch.Generator().manual_seed(2))
    sae.save_inference_model(tmp_path / "inference")
    loaded = SAE.load_from_disk(tmp_path / "inference")
    assert (loaded.cfg.pool_fraction, loaded.cfg.pool_factor) == (0.375, None)
    # the inference SAE's first seeded draw is training step 0's
    with torch.no_grad():
        expected = sae.encode_batch(x)
        got = loaded.encode_batch(x)
    assert torch.equal(got != 0, expected != 0)
    torch.testing.assert_close(got, expected)
    # a pool of 12 of 32 features: only they can be selected
    assert int((expected != 0).any(dim=0).sum()) <= 12


def test_a_file_saved_with_pool_factor_loads_unchanged(tmp_path):
    # 0.2 wrote pool_factor (default 16) and had no pool_fraction field
    sae = trained_sae(pool_factor=3.0)
    sae.save_inference_model(tmp_path / "inference")
    path = tmp_path / "inference" / "cfg.json"
    cfg = json.loads(path.read_text())
    del cfg["pool_fraction"]
    path.write_text(json.dumps(cfg))
    loaded = SAE.load_from_disk(tmp_path / "inference")
    assert (loaded.cfg.pool_factor, loaded.cfg.pool_fraction) == (3.0, None)
    assert config_pool_size(loaded.cfg) == 6
    x = torch.randn(24, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = sae.encode_batch(x)
        got = loaded.encode_batch(x)
    assert int((expected != 0).any(dim=0).sum()) <= 6
    assert torch.equal(got != 0, expected != 0)
