"""`sae-lens-sampled train`: SAELens's CLI with the plugin architectures."""

import subprocess
import sys

import pytest
from sae_lens import LanguageModelSAETrainingRunner
from sae_lens.llm_sae_training_runner import _parse_cfg_args

from sae_lens_sampled import MutualChoiceTrainingSAEConfig, SampledTrainingSAEConfig
from sae_lens_sampled.cli import main
from tests.helpers import CONTEXT, HOOK, tiny_model, token_dataset


def test_train_help_lists_plugin_fields():
    result = subprocess.run(
        [sys.executable, "-m", "sae_lens_sampled", "train", "--architecture",
         "sampled", "--help"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for flag in ("--pool_factor", "--score", "--pool_mode", "--pool_seed", "-k"):
        assert flag in result.stdout


def test_top_level_help_and_unknown_command(capsys):
    assert main([]) == 2
    assert "train" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["nonsense"])


def test_parsed_cli_config_trains_offline(tmp_path):
    cfg = _parse_cfg_args(
        ["--architecture", "sampled", "--d_in", "32", "--d_sae", "64", "-k", "3",
         "--pool_factor", "2.5", "--score", "entropy", "--hook_name", HOOK,
         "--context_size", str(CONTEXT), "--training_tokens", str(20 * 64),
         "--train_batch_size_tokens", "64", "--n_batches_in_buffer", "8",
         "--store_batch_size_prompts", "4", "--device", "cpu",
         "--log_to_wandb", "False", "--prepend_bos", "False",
         "--exclude_special_tokens", "False",
         "--checkpoint_path", str(tmp_path / "ckpt"), "--n_checkpoints", "0",
         "--output_path", str(tmp_path / "out")]
    )  # fmt: skip
    assert isinstance(cfg.sae, SampledTrainingSAEConfig)
    assert (cfg.sae.k, cfg.sae.pool_factor, cfg.sae.score) == (3, 2.5, "entropy")
    sae = LanguageModelSAETrainingRunner(
        cfg, override_model=tiny_model(), override_dataset=token_dataset(100)
    ).run()
    assert sae.cfg.metadata.l0 == pytest.approx(3.0, abs=0.05)
    assert (tmp_path / "out" / "cfg.json").exists()


def test_cli_rejects_bad_plugin_value():
    with pytest.raises(ValueError, match="pool_factor must be in"):
        _parse_cfg_args(["--architecture", "sampled", "--pool_factor", "0.5"])


def test_mutual_choice_cli_defaults():
    cfg = _parse_cfg_args(["--architecture", "mutual_choice", "-k", "8"])
    assert isinstance(cfg.sae, MutualChoiceTrainingSAEConfig)
    assert cfg.sae.threshold_mode == "rate"
    assert cfg.sae.k == 8
