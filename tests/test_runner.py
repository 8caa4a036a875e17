"""Training through SAELens's LanguageModelSAETrainingRunner, offline."""

from pathlib import Path

import pytest
import torch
from sae_lens import (
    SAE,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    TrainingSAE,
)

from sae_lens_sampled import (
    MutualChoiceSAE,
    MutualChoiceTrainingSAE,
    MutualChoiceTrainingSAEConfig,
    SampledSAE,
    SampledTrainingSAE,
    SampledTrainingSAEConfig,
)
from tests.helpers import D_MODEL, runner_config, tiny_model, token_dataset

CASES = {
    "sampled": (
        SampledTrainingSAEConfig(d_in=D_MODEL, d_sae=128, k=4, pool_factor=4),
        SampledSAE,
        SampledTrainingSAE,
    ),
    "mutual_choice": (
        MutualChoiceTrainingSAEConfig(d_in=D_MODEL, d_sae=128, k=4),
        MutualChoiceSAE,
        MutualChoiceTrainingSAE,
    ),
}


@pytest.mark.parametrize("architecture", sorted(CASES))
def test_runner_trains_saves_and_loads(architecture, tmp_path: Path):
    sae_cfg, inference_cls, training_cls = CASES[architecture]
    cfg = runner_config(sae_cfg, tmp_path, steps=30, n_checkpoints=1)
    runner = LanguageModelSAETrainingRunner(
        cfg, override_model=tiny_model(), override_dataset=token_dataset()
    )
    trained = runner.run()
    assert isinstance(trained, training_cls)
    assert trained.cfg.metadata.l0 == pytest.approx(4.0, abs=0.05)
    # thresholds were learned during training
    assert torch.isfinite(trained.running_threshold).any()
    assert trained.n_tokens_seen.item() == 30 * 128

    loaded = SAE.load_from_disk(tmp_path / "final")
    assert isinstance(loaded, inference_cls)
    assert loaded.cfg.architecture() == architecture
    x = torch.randn(2, 5, D_MODEL)
    trained.eval()
    torch.testing.assert_close(
        loaded.encode(x), trained.encode(x), rtol=1e-5, atol=1e-6
    )

    [checkpoint_root] = list((tmp_path / "checkpoints").iterdir())
    [checkpoint] = list(checkpoint_root.iterdir())
    restored = TrainingSAE.load_from_disk(checkpoint)
    assert isinstance(restored, training_cls)
    restored_fields, trained_fields = restored.cfg.to_dict(), trained.cfg.to_dict()
    restored_fields.pop("metadata"), trained_fields.pop("metadata")
    assert restored_fields == trained_fields
    # the checkpoint is taken half way through training
    assert restored.state_dict().keys() == trained.state_dict().keys()
    assert 0 < restored.n_tokens_seen.item() < 30 * 128
    assert restored.running_threshold.dtype == torch.float64
    resumed = training_cls(trained.cfg)
    resumed.load_weights_from_checkpoint(checkpoint)  # SAELens's resume path
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name


def test_runner_config_dict_round_trip(tmp_path: Path):
    sae_cfg = SampledTrainingSAEConfig(
        d_in=D_MODEL, d_sae=96, k=3.5, pool_factor=2.5, score="entropy", pool_mode="top"
    )
    cfg = runner_config(sae_cfg, tmp_path)
    as_dict = cfg.to_dict()
    assert as_dict["sae"]["architecture"] == "sampled"
    rebuilt = LanguageModelSAERunnerConfig.from_dict(as_dict)
    assert isinstance(rebuilt.sae, SampledTrainingSAEConfig)
    assert rebuilt.sae.pool_factor == 2.5
    assert rebuilt.sae.score == "entropy"
    assert rebuilt.sae.k == 3.5
    assert rebuilt.to_dict() == as_dict
