"""Sparse probing end to end: ``compare --labels`` and ``probe OUTPUT_DIR`` on a tiny
activations file (few steps, small d_sae)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_lens_sampled.benchmark import RunSpec, run_compare
from sae_lens_sampled.benchmark.activations import ActivationsSource
from sae_lens_sampled.benchmark.config import CompareConfig
from sae_lens_sampled.cli import main as cli_main

N_ROWS, D_IN, N_DOCS = 1_536, 16, 96
RUNS = [RunSpec("batchtopk"), RunSpec("sampled", {"pool_factor": 2.0})]
SMALL = ["--architectures", "batchtopk,sampled:pool_factor=2.0", "--k", "3"]
SMALL += [
    "--d-sae",
    "32",
    "--steps",
    "8",
    "--batch-size",
    "128",
    "--eval-samples",
    "256",
]
SETTINGS = {
    "runs": RUNS,
    "k": 3,
    "d_sae": 32,
    "steps": 8,
    "batch_size": 128,
    "eval_samples": 256,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Activations in which dimension t carries topic t of the row's document, and
    dimension 4 the row's parity; the labels: ``topic`` (per document, 4 classes), ``doc`` (the group ids) and
    ``parity`` (per row)."""
    folder = tmp_path_factory.mktemp("probe_data")
    generator = torch.Generator().manual_seed(0)
    doc = torch.randint(0, N_DOCS, (N_ROWS,), generator=generator)
    topic = (torch.arange(N_DOCS) % 4)[doc]
    parity = torch.randint(0, 2, (N_ROWS,), generator=generator)
    rows = torch.randn(N_ROWS, D_IN, generator=generator)
    rows[torch.arange(N_ROWS), topic] += 3.0
    rows[:, 4] += 2.0 * parity
    np.save(folder / "acts.npy", rows.numpy())
    np.savez(
        folder / "labels.npz",
        topic=topic.numpy(),
        doc=doc.numpy().astype(np.int32),
        parity=parity.numpy(),
    )
    return {"acts": folder / "acts.npy", "labels": folder / "labels.npz"}


@pytest.fixture(scope="module")
def compared(data, tmp_path_factory) -> tuple[Path, dict]:
    # docs/compare.md's command, at test size.
    output = tmp_path_factory.mktemp("probe_compare") / "results"
    argv = ["compare", "--activations", str(data["acts"])]
    argv += ["--labels", f"{data['labels']}:topic", "--groups", f"{data['labels']}:doc"]
    argv += ["--seeds", "2", "--output", str(output), *SMALL]
    assert cli_main(argv) == 0
    return output, json.loads((output / "results.json").read_text())


def test_compare_probes_every_run_and_seed(compared):
    output, payload = compared
    results = payload["results"]
    assert len(results) == 4
    for result in results:
        task = result["probing"]["tasks"]["topic"]
        assert set(task["k"]) == {"1", "2", "5", "20"}
        assert len(task["latents"]) == 4  # four topics, all probed
        for k in ("1", "2", "5", "20"):
            assert len(task["k"][k]["balanced_accuracy"]) == 4
            assert result[f"probe_k{k}"] == pytest.approx(
                task["k"][k]["mean_balanced_accuracy"]
            )
    setup = payload["probing"]["setup"]
    assert setup["units"] == "groups" and setup["n_units"] == N_DOCS
    assert setup["tasks"]["topic"]["classes"] == [0, 1, 2, 3]
    baselines = payload["probing"]["baselines"]
    assert set(baselines["random"]) == {"0", "1"}
    assert baselines["random_directions"] == 32
    # Each topic is written in one raw dimension: the raw probe finds it at k = 1.
    raw = baselines["raw"]["tasks"]["topic"]
    assert [latents[0] for latents in raw["latents"]] == [0, 1, 2, 3]
    assert min(raw["k"]["1"]["balanced_accuracy"]) > 0.9
    summary = payload["summary"]
    assert summary[0]["probe_k1_std"] is not None  # two seeds: mean ± std
    saved = json.loads((output / "results.json").read_text())
    assert saved["probing"]["baselines"]["raw"]["mean"] == pytest.approx(
        baselines["raw"]["mean"]
    )
    assert (output / "probing.md").read_text().startswith("| run | task | seeds |")
    assert (output / "probing.png").is_file()


def test_probe_command_reproduces_compare_and_takes_other_label_sets(
    compared, data, capsys
):
    output, payload = compared
    labels, groups = f"{data['labels']}:topic", f"{data['labels']}:doc"
    argv = ["probe", str(output), "--labels", labels, "--groups", groups]
    assert cli_main([*argv, "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "| batchtopk | topic | 2 |" in printed
    probed = json.loads((output / "probe_results.json").read_text())
    # The same SAEs on the same rows, labels and split: the same probes.
    for ours, theirs in zip(probed["results"], payload["results"], strict=True):
        assert (ours["label"], ours["seed"]) == (theirs["label"], theirs["seed"])
        ours_task = ours["probing"]["tasks"]["topic"]
        theirs_task = theirs["probing"]["tasks"]["topic"]
        assert ours_task["latents"] == theirs_task["latents"]
        for k in ("1", "2", "5", "20"):
            assert ours_task["k"][k]["balanced_accuracy"] == pytest.approx(
                theirs_task["k"][k]["balanced_accuracy"]
            )
    assert (output / "probe_table.md").is_file()

    # A token-level task on the same SAEs, without groups, under its own tag.
    argv = ["probe", str(output), "--labels", f"{data['labels']}:parity"]
    assert cli_main([*argv, "--tag", "parity"]) == 0
    parity = json.loads((output / "probe_results_parity.json").read_text())
    assert parity["probing"]["setup"]["units"] == "rows"
    assert parity["probing"]["setup"]["n_units"] == N_ROWS
    raw = parity["probing"]["baselines"]["raw"]["tasks"]["parity"]
    assert raw["latents"][0][0] == 4 and raw["k"]["1"]["balanced_accuracy"][0] > 0.75
    assert (output / "probe_parity.png").is_file()
    assert (output / "probe_table_parity.md").read_text().count("| parity |") == 4


def test_label_files_are_checked_before_anything_trains(data, tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained before the label files were checked")

    monkeypatch.setattr(ActivationsSource, "train", no_training)
    np.save(tmp_path / "short.npy", np.zeros(N_ROWS - 1, dtype=np.int64))
    settings = {"activations": str(data["acts"]), "output": None, **SETTINGS}
    with pytest.raises(ValueError, match=r"1,535 values; the activations have 1,536"):
        run_compare(labels=str(tmp_path / "short.npy"), **settings)
    with pytest.raises(ValueError, match="rows of one group hold different labels"):
        run_compare(
            labels=f"{data['labels']}:parity",
            groups=f"{data['labels']}:doc",
            **settings,
        )
    with pytest.raises(ValueError, match="labels=.* needs activations"):
        CompareConfig(labels="labels.npy")
    with pytest.raises(ValueError, match="groups=.* needs labels"):
        CompareConfig(activations="acts.npy", groups="groups.npy")
    argv = ["compare", "--activations", str(data["acts"])]
    assert cli_main([*argv, "--labels", str(tmp_path / "short.npy")]) == 2


def test_probe_command_errors(tmp_path, data, capsys):
    assert cli_main(["probe", str(tmp_path), "--labels", str(data["labels"])]) == 2
    assert "no results.json" in capsys.readouterr().err
