"""Every ``--help`` renders; ``compare`` and ``bench`` answer ``--help`` and argument
errors before torch or SAELens is imported; the usual faults of the machine end in
one line (``--debug``: the traceback)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sae_lens.load_model
import torch
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

from sae_lens_sampled.cli import main

REPO = Path(__file__).resolve().parents[1]
# argparse's own text when a help string holds a lone "%" it cannot format.
BROKEN_HELP = ("'option_strings'", "<argparse.")


def check_renders(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 0, argv
    out = capsys.readouterr().out
    assert "usage:" in out
    for broken in BROKEN_HELP:
        assert broken not in out, (argv, broken)
    return out


@pytest.mark.parametrize("command", [[], ["compare"], ["bench"], ["train"]])
def test_command_help_renders(command, capsys):
    check_renders([*command, "--help"], capsys)


@pytest.mark.parametrize("architecture", sorted(SAE_TRAINING_CLASS_REGISTRY))
def test_train_help_of_every_architecture_renders(architecture, capsys):
    out = check_renders(["train", "--architecture", architecture, "--help"], capsys)
    assert "--d_sae" in out


def test_help_and_argument_errors_come_before_torch_and_saelens():
    calls = [
        (["compare", "--help"], 0),
        (["bench", "--help"], 0),
        (["compare", "--steps", "0"], 2),
        (["compare", "--k", "abc"], 2),
        (["compare", "--architectures", "topk:k"], 2),
        (["compare", "--resume", "--overwrite"], 2),
        (["compare", "--activations", "/nonexistent/acts.npy"], 2),
        (["bench", "--shape", "1,2"], 2),
    ]
    code = (
        "import sys\n"
        "from sae_lens_sampled.cli import main\n"
        f"codes = [main(argv) for argv, _ in {calls!r}]\n"
        "print(codes)\n"
        "print(sorted(m for m in ('torch', 'sae_lens') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    codes, imported = result.stdout.splitlines()[-2:]
    assert codes == str([expected for _, expected in calls])
    assert imported == "[]"


@pytest.mark.parametrize(
    "argv",
    [
        ["compare", "--architectures", "topk", "--steps", "2", "--device", "cuda"],
        ["train", "--architecture", "sampled", "--device", "cuda"],
        ["bench", "--device", "cuda:0"],
    ],
)
def test_missing_cuda_is_one_line(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    output = {"compare": "--output", "train": "--output_path", "bench": "--json"}
    assert main([*argv, output[argv[0]], str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert re.search(r"device is 'cuda(:0)?', but CUDA is not available here", err)


def offline_hub(*args, **kwargs):
    # What transformers raises for a model that is neither cached nor downloadable.
    raise OSError(
        "We couldn't connect to 'https://huggingface.co' to load the files, and "
        "couldn't find them in the cached files.\nCheck your internet connection."
    )


def test_hub_model_offline_is_one_line_and_debug_shows_the_traceback(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(sae_lens.load_model, "load_model", offline_hub)
    argv = ["compare", "--model", "pythia-14m", "--hook", "blocks.0.hook_resid_post"]
    argv += ["--output", str(tmp_path / "out")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == (
        "sae-lens-sampled compare: error: We couldn't connect to "
        "'https://huggingface.co' to load the files, and couldn't find them in the "
        "cached files. Check your internet connection. (--debug shows the "
        "traceback)\n"
    )
    with pytest.raises(OSError, match="couldn't connect"):
        main(["--debug", *argv])


@pytest.mark.parametrize("error", ["KeyboardInterrupt", "InterruptedException"])
def test_ctrl_c_in_any_command_is_one_line(error, monkeypatch, capsys):
    from sae_lens.training._interruption import InterruptedException

    from sae_lens_sampled import cli

    raised = {"KeyboardInterrupt": KeyboardInterrupt,
              "InterruptedException": InterruptedException}[error]  # fmt: skip

    def interrupted(argv):
        raise raised()

    monkeypatch.setitem(cli.RUNNERS, "train", interrupted)
    assert main(["train", "--architecture", "sampled"]) == 130
    assert capsys.readouterr().err == "sae-lens-sampled train: interrupted\n"
    with pytest.raises(raised):
        main(["--debug", "train"])


def test_debug_shows_the_traceback_of_a_compare_error(tmp_path, capsys):
    argv = ["compare", "--steps", "0"]
    assert main(argv) == 2
    assert capsys.readouterr().err == "error: steps must be in [1, inf), got 0\n"
    with pytest.raises(ValueError, match=r"steps must be in \[1, inf\), got 0"):
        main(["--debug", *argv])
    (tmp_path / "x").write_text("")
    with pytest.raises(ValueError, match="already holds files"):
        main(["compare", "--output", str(tmp_path), "--debug"])
    assert main(argv) == 2  # --debug applies to one command only
