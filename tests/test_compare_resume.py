"""``compare`` survives interruption: results after every run, Ctrl-C, --resume,
and an output directory that is never mixed with another comparison's."""

from __future__ import annotations

import json

import pytest
from sae_lens.training._interruption import InterruptedException

from sae_lens_sampled.benchmark import loop, run_compare
from sae_lens_sampled.benchmark.output_dir import check_output
from sae_lens_sampled.benchmark.specs import parse_run_specs
from sae_lens_sampled.cli import main as cli_main

SETTINGS = dict(k=2, d_sae=32, steps=4, batch_size=64, eval_samples=128, plots=False)
RUNS = "topk,mutual_choice,batchtopk"
ARGV = ["compare", "--architectures", RUNS, "--k", "2", "--d-sae", "32"]
ARGV += ["--steps", "4", "--batch-size", "64", "--eval-samples", "128", "--no-plots"]


def interrupt_at(monkeypatch, call: int, error: type[BaseException]) -> list[str]:
    """Make the ``call``-th training raise ``error``; return the labels trained."""
    trained: list[str] = []
    original = loop.train_and_evaluate

    def train(cfg, source, spec, seed, run_dir):
        trained.append(spec.label)
        if len(trained) == call:
            raise error()
        return original(cfg, source, spec, seed, run_dir)

    monkeypatch.setattr(loop, "train_and_evaluate", train)
    return trained


def saved(output) -> dict:
    return json.loads((output / "results.json").read_text())


def test_ctrl_c_keeps_the_finished_runs_and_resume_trains_only_the_rest(
    tmp_path, monkeypatch, capsys
):
    output = tmp_path / "out"
    interrupt_at(monkeypatch, 2, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        run_compare(runs=parse_run_specs(RUNS), output=str(output), **SETTINGS)
    err = capsys.readouterr().err  # SAELens's progress bars, then one line
    assert err.splitlines()[-1] == (
        f"interrupted: 1 of 3 runs finished, kept in {output / 'results.json'}; "
        "continue with --resume"
    )
    first = saved(output)
    assert [r["label"] for r in first["results"]] == ["topk"]
    assert first["complete"] is False
    assert "| topk |" in (output / "table.md").read_text()
    assert (output / "table.csv").read_text().splitlines()[1].startswith("topk,0,")

    monkeypatch.undo()
    trained = interrupt_at(monkeypatch, 0, KeyboardInterrupt)  # never interrupts
    payload = run_compare(
        runs=parse_run_specs(RUNS), output=str(output), resume=True, **SETTINGS
    )
    assert trained == ["mutual_choice", "batchtopk"]
    assert "[1/3] topk: kept from results.json" in capsys.readouterr().out
    assert payload["complete"] is True
    assert [r["label"] for r in payload["results"]] == RUNS.split(",")
    assert payload["results"][0] == first["results"][0]
    assert saved(output) == json.loads(json.dumps(payload))
    assert len(list((output / "saes").glob("*/cfg.json"))) == 3
    for r in payload["results"]:  # each result says where its SAE is
        assert (output / r["sae_dir"] / "cfg.json").is_file()


def test_resume_refuses_other_settings_and_overwrite_starts_afresh(
    tmp_path, monkeypatch
):
    output = tmp_path / "out"
    run_compare(runs=parse_run_specs("topk"), output=str(output), **SETTINGS)
    with pytest.raises(ValueError, match="written with steps=4, this comparison has"):
        run_compare(
            runs=parse_run_specs("topk"),
            output=str(output),
            resume=True,
            **{**SETTINGS, "steps": 5},
        )
    (output / "notes.txt").write_text("mine")
    trained = interrupt_at(monkeypatch, 0, KeyboardInterrupt)
    payload = run_compare(
        runs=parse_run_specs("mutual_choice"),
        output=str(output),
        overwrite=True,
        **SETTINGS,
    )
    assert trained == ["mutual_choice"]
    assert [r["label"] for r in payload["results"]] == ["mutual_choice"]
    assert [p.name for p in (output / "saes").iterdir()] == ["01_mutual_choice"]
    assert (output / "notes.txt").read_text() == "mine"  # not compare's: kept


def test_output_with_files_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    (tmp_path / "saes").mkdir()
    with pytest.raises(ValueError, match="already holds files; pass --resume"):
        check_output(str(tmp_path), resume=False, overwrite=False)
    check_output(str(tmp_path), resume=True, overwrite=False)
    check_output(str(tmp_path / "new"), resume=False, overwrite=False)
    assert cli_main([*ARGV, "--output", str(tmp_path)]) == 2
    assert "already holds files; pass --resume" in capsys.readouterr().err
    assert cli_main([*ARGV, "--output", str(tmp_path), "--resume", "--overwrite"]) == 2
    assert "resume and overwrite are exclusive" in capsys.readouterr().err


@pytest.mark.parametrize("error", [KeyboardInterrupt, InterruptedException])
def test_cli_ctrl_c_is_one_line_and_exit_130(error, tmp_path, monkeypatch, capsys):
    # SAELens's language-model runner turns SIGINT into InterruptedException.
    interrupt_at(monkeypatch, 1, error)
    assert cli_main([*ARGV, "--output", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err
    assert err == "interrupted: 0 of 3 runs finished, nothing written\n"
