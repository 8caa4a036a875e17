"""`sae-lens-sampled`: a light top level, and `train` = SAELens's CLI with the plugin."""

import dataclasses
import os
import re
import subprocess
import sys
import warnings
from importlib.metadata import version
from pathlib import Path

import pytest
from sae_lens import LanguageModelSAETrainingRunner
from sae_lens.llm_sae_training_runner import _parse_cfg_args
from sae_lens.saes.sae import TrainingSAEConfig

from sae_lens_sampled import MutualChoiceTrainingSAEConfig, SampledTrainingSAEConfig
from sae_lens_sampled._plugin import ENTRIES
from sae_lens_sampled.cli import main
from tests.helpers import CONTEXT, HOOK, tiny_model, token_dataset

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------
# The top level
# ---------------------------------------------------------------------------


def test_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sae-lens-sampled [-h] [--version] [--debug] COMMAND")
    for command in ("train", "compare", "bench", "probe"):
        assert re.search(rf"^  {command} ", out, re.MULTILINE)


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "commands:" in capsys.readouterr().err


def test_unknown_command_and_option_fail_with_one_message(capsys):
    assert main(["nonsense"]) == 2
    err = capsys.readouterr().err
    assert (
        "error: unknown command 'nonsense' (choose from train, compare, bench, probe)"
        in err
    )
    assert main(["--verbose", "train"]) == 2
    assert "error: unrecognized option --verbose" in capsys.readouterr().err


def project_version() -> str:
    text = (REPO / "pyproject.toml").read_text()
    project = text[text.index("[project]") :]
    return re.search(r'^version = "([^"]+)"', project, re.MULTILINE).group(1)


def test_version_is_the_package_metadata(capsys):
    import sae_lens_sampled

    assert main(["--version"]) == 0
    assert (
        capsys.readouterr().out == f"sae-lens-sampled {version('sae-lens-sampled')}\n"
    )
    assert sae_lens_sampled.__version__ == version("sae-lens-sampled")
    assert version("sae-lens-sampled") == project_version()


def test_help_and_version_import_neither_torch_nor_saelens():
    # What the console script runs; timed by experiments/cli_timing.py.
    code = (
        "import sys\n"
        "from sae_lens_sampled.cli import main\n"
        "main(['--help']); main(['--version'])\n"
        "print(sorted(m for m in ('torch', 'sae_lens', 'transformer_lens', 'numpy')"
        " if m in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert result.stdout.splitlines()[-1] == "[]"


# ---------------------------------------------------------------------------
# train: help
# ---------------------------------------------------------------------------


def own_fields(config_class: type) -> list[str]:
    saelens = {f.name for f in dataclasses.fields(TrainingSAEConfig)}
    return [f.name for f in dataclasses.fields(config_class) if f.name not in saelens]


def flag(name: str) -> str:
    return f"-{name}" if len(name) == 1 else f"--{name}"


def test_train_help_lists_each_plugin_architecture_and_its_fields(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "train --architecture NAME --help" in " ".join(lines[:3])
    header = out[: out.index("usage:")]
    for entry in ENTRIES:
        # Every field of the architecture is listed, under it or under "all of them".
        block = header[header.index(f"  {entry.key} ") :]
        for name in own_fields(entry.training_config_class):
            assert f"{flag(name)} " in block, (entry.key, name)
    assert re.search(r"^usage: sae-lens-sampled train ", out, re.MULTILINE)


@pytest.mark.parametrize("architecture", sorted(entry.key for entry in ENTRIES))
def test_train_architecture_help_describes_its_flags(architecture, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # runpy's warning is silenced
        assert main(["train", "--architecture", architecture, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sae-lens-sampled train ")
    config_class = {e.key: e.training_config_class for e in ENTRIES}[architecture]
    assert f"{config_class.__name__} ['cfg.sae']:" in out
    for name in own_fields(config_class):
        assert re.search(rf"^  {re.escape(flag(name))} ", out, re.MULTILINE), name


# ---------------------------------------------------------------------------
# train: bad values
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pool_factor", "0.5"], "pool_factor must be in [1, inf), got 0.5"),
        (["--d_sae", "16"], "k must be in (0, 16], got 100 (the default)"),
        (
            ["--pool_factor", "abc"],
            "argument --pool_factor: invalid float value: 'abc'",
        ),
    ],
)
def test_bad_value_is_one_line(args, message, capsys):
    assert main(["train", "--architecture", "sampled", *args]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"sae-lens-sampled train: error: {message}\n"
    assert captured.out == ""


def test_debug_shows_the_error_itself():
    with pytest.raises(ValueError, match=r"pool_factor must be in \[1, inf\)"):
        main(["--debug", "train", "--architecture", "sampled", "--pool_factor", "0.5"])
    with pytest.raises(ValueError, match=r"pool_factor must be in \[1, inf\)"):
        main(["train", "--architecture", "sampled", "--pool_factor", "0.5", "--debug"])


def test_bad_value_in_a_fresh_process_is_one_line():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["SAE_LENS_SAMPLED_AUTOLOAD"] = "0"
    result = subprocess.run(
        [sys.executable, "-m", "sae_lens_sampled", "train", "--architecture",
         "feature_choice", "--rerank_every", "0"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == (
        "sae-lens-sampled train: error: rerank_every must be in [1, inf), got 0\n"
    )


# ---------------------------------------------------------------------------
# SAELens's parser with the plugin's configs
# ---------------------------------------------------------------------------


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


def test_cli_timing_benchmark_reports_median_min_max():
    from experiments import cli_timing

    table = cli_timing.report({"sae-lens-sampled --help": ([0.3, 0.1, 0.2], {0})})
    header, row = table.splitlines()
    assert header.split() == ["command", "median", "s", "min", "s", "max", "s", "n",
                              "exit"]  # fmt: skip
    assert row.split() == ["sae-lens-sampled", "--help", "0.200", "0.100", "0.300",
                           "3", "0"]  # fmt: skip
    names = [name for name, _ in cli_timing.commands(train=False)]
    assert names[1:3] == ["sae-lens-sampled --help", "sae-lens-sampled --version"]
