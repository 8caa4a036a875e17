"""Sparse probing (``benchmark/probing.py``): hand-built data with known answers,
scikit-learn as the reference for the logistic regression, and bad label files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sae_lens_sampled.benchmark.probing import (
    balanced_accuracy,
    build_probe_set,
    fit_logistic_regression,
    group_units,
    load_groups,
    load_labels,
    mean_differences,
    pool_rows,
    probe_encoder,
    probe_features,
    probe_random_directions,
    random_directions,
    split_file_spec,
    split_train,
    table_fields,
    top_classes,
    top_latents,
    unit_labels,
)


def mean_pool(
    features: torch.Tensor, unit_of_row: torch.Tensor, n_units: int
) -> torch.Tensor:
    """Reference: the mean of ``features`` ``[n_rows, F]`` over each unit's rows."""
    sums = torch.zeros(n_units, features.shape[1], dtype=features.dtype)
    sums.index_add_(0, unit_of_row, features)
    counts = torch.bincount(unit_of_row, minlength=n_units).clamp_min(1)
    return sums / counts.unsqueeze(1).to(features.dtype)


# ---------------------------------------------------------------------------
# Logistic regression against scikit-learn


@pytest.mark.parametrize("balanced_weights", [True, False])
@pytest.mark.parametrize("l2", [0.1, 1.0, 10.0])
def test_logistic_regression_matches_scikit_learn(balanced_weights, l2):
    linear_model = pytest.importorskip("sklearn.linear_model")
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(300, 6, generator=generator)
    x = x * torch.tensor([1.0, 2.0, 3.0, 0.5, 1.0, 10.0]) + 3.0
    noise = torch.randn(300, generator=generator)
    y = x[:, 0] + 0.3 * x[:, 1] + noise > 3.8  # imbalanced: about 40 % positive
    probe = fit_logistic_regression(x, y, l2=l2, balanced=balanced_weights)

    z = ((x.double() - x.double().mean(0)) / x.double().std(0, unbiased=False)).numpy()
    reference = linear_model.LogisticRegression(
        C=1 / l2,
        class_weight="balanced" if balanced_weights else None,
        tol=1e-12,
        max_iter=10_000,
    ).fit(z, y.numpy())
    np.testing.assert_allclose(probe.weight.numpy(), reference.coef_[0], atol=1e-6)
    assert probe.bias == pytest.approx(reference.intercept_[0], abs=1e-6)
    assert np.array_equal(probe.predict(x).numpy(), reference.predict(z))


def test_constant_inputs_get_no_weight():
    x = torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0], [0.0, 4.0]])
    y = torch.tensor([False, False, True, True])
    probe = fit_logistic_regression(x, y)
    assert probe.scale[0] == 1.0 and probe.weight[0] == 0.0
    assert probe.predict(x).tolist() == y.tolist()


def test_balanced_accuracy_by_hand():
    target = torch.tensor([True, False, False, False])
    predicted = torch.tensor([True, True, False, False])
    assert balanced_accuracy(predicted, target) == pytest.approx(0.5 * (1.0 + 2 / 3))


# ---------------------------------------------------------------------------
# One latent that is the label


def labelled_latents(n: int = 600, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels 0..3 (class 3 rarest); latent c + 2 fires exactly on class c's rows
    for c < 3, every other latent is noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.multinomial(
        torch.tensor([0.4, 0.3, 0.2, 0.1]), n, replacement=True, generator=generator
    )
    latents = torch.rand(n, 8, generator=generator)
    for c in range(3):
        latents[:, c + 2] = (labels == c).float() * 3.0
    return latents, labels


def test_the_label_latent_is_chosen_and_probes_perfectly_at_k1():
    latents, labels = labelled_latents()
    probe_set = build_probe_set({"letter": labels})
    result = probe_features(latents, probe_set)
    task = result["tasks"]["letter"]
    assert probe_set.tasks[0].classes == [0, 1, 2, 3]  # most frequent first
    for c in range(3):
        assert task["latents"][c][0] == c + 2
        assert task["k"]["1"]["balanced_accuracy"][c] == 1.0
        assert task["k"]["1"]["accuracy"][c] == 1.0
    # Class 3 has no latent of its own: the largest mean difference is class 0's
    # latent, silent on class 3 and on for 0.4 / 0.9 of the rest.
    assert task["latents"][3][0] == 2
    assert set(result["mean"]) == {"1", "2", "5", "20"}
    fields = table_fields(result)
    assert fields["probe_k1"] == pytest.approx(result["mean"]["1"])


def test_streamed_probes_equal_the_in_memory_probes_on_pooled_groups():
    # 100 documents of 1 to 7 rows (395 in all), rows shuffled over the file.
    generator = torch.Generator().manual_seed(2)
    groups = torch.arange(100).repeat_interleave(torch.arange(100) % 7 + 1)
    groups = groups[torch.randperm(groups.numel(), generator=generator)]
    latents, _ = labelled_latents(n=groups.numel(), seed=1)
    doc_label = torch.randint(0, 3, (100,), generator=generator)
    labels = doc_label[groups]
    latents[:, 6] = labels.float()  # one latent says the document's class, per row
    probe_set = build_probe_set({"doc": labels}, groups)
    assert probe_set.n_units == 100 and probe_set.grouped

    def batches():
        return iter(latents.split(64))

    streamed = probe_encoder(lambda x: x * 1.0, batches, probe_set)
    pooled = mean_pool(latents.double(), probe_set.unit_of_row, probe_set.n_units)
    in_memory = probe_features(pooled, probe_set)
    assert streamed["tasks"]["doc"]["latents"] == in_memory["tasks"]["doc"]["latents"]
    assert streamed["mean"] == pytest.approx(in_memory["mean"], abs=1e-9)
    assert torch.allclose(pool_rows(batches, probe_set), pooled)


def test_random_directions_probe_the_projected_activations():
    generator = torch.Generator().manual_seed(3)
    pooled = torch.randn(200, 5, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (200,), generator=generator)
    pooled[:, 0] += labels
    probe_set = build_probe_set({"t": labels})
    directions = random_directions(5, 12, seed=7)
    assert torch.allclose(directions.norm(dim=0), torch.ones(12, dtype=torch.float64))
    via_activations = probe_random_directions(pooled, probe_set, 12, seed=7)
    projected = probe_features(pooled @ directions, probe_set)
    assert (
        via_activations["tasks"]["t"]["latents"] == projected["tasks"]["t"]["latents"]
    )
    assert via_activations["mean"] == pytest.approx(projected["mean"], abs=1e-9)


def test_mean_difference_and_selection_by_hand():
    features = torch.tensor(
        [[1.0, 0.0, 5.0], [3.0, 0.0, 5.0], [0.0, 4.0, 1.0], [0.0, 0.0, 3.0]]
    )
    labels = torch.tensor([1, 1, 0, 0])
    train = torch.tensor([True, True, True, False])
    differences = mean_differences(features, labels, train, [1, 0])
    # class 1: mean(rows 0, 1) - row 2; class 0: row 2 - mean(rows 0, 1)
    expected = torch.tensor([[2.0, -4.0, 4.0], [-2.0, 4.0, -4.0]], dtype=torch.float64)
    assert torch.equal(differences, expected)
    assert top_latents(differences, 2).tolist() == [[1, 2], [1, 2]]


# ---------------------------------------------------------------------------
# Groups, classes and the split


def test_mean_pool_and_group_labels_by_hand():
    groups = torch.tensor([7, 3, 7, 3, 9])
    unit_of_row, sizes = group_units(groups)
    assert unit_of_row.tolist() == [1, 0, 1, 0, 2] and sizes.tolist() == [2, 2, 1]
    rows = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 1.0]])
    pooled = mean_pool(rows, unit_of_row, 3)
    assert pooled.tolist() == [[5.0, 6.0], [3.0, 4.0], [9.0, 1.0]]
    labels = torch.tensor([1, 0, 1, 0, 2])
    assert unit_labels(labels, unit_of_row, 3, "t").tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="rows of one group hold different labels"):
        unit_labels(torch.tensor([1, 0, 2, 0, 2]), unit_of_row, 3, "t")


def test_split_is_stratified_seeded_and_by_group():
    labels = torch.tensor([0] * 50 + [1] * 10 + [2] * 2 + [3])
    train = split_train(labels, 0.2, seed=0)
    assert [int((~train & (labels == c)).sum()) for c in range(4)] == [10, 2, 1, 0]
    assert torch.equal(train, split_train(labels, 0.2, seed=0))
    assert not torch.equal(train, split_train(labels, 0.2, seed=1))
    with pytest.raises(ValueError, match="eval_fraction must be in"):
        split_train(labels, 1.0)

    groups = torch.arange(40).repeat_interleave(3)
    row_labels = (groups % 2)[torch.arange(120)]
    probe_set = build_probe_set({"parity": row_labels}, groups, seed=5)
    unit_train = probe_set.tasks[0].train
    assert int((~unit_train).sum()) == 8  # 4 groups of each class
    row_train = unit_train[probe_set.unit_of_row]
    for group in range(40):  # a group's rows are all train or all eval
        assert row_train[groups == group].unique().numel() == 1


def test_top_classes_keeps_the_most_frequent():
    labels = torch.tensor([5] * 4 + [2] * 3 + [9] * 3 + [1] * 2 + [0])
    assert top_classes(labels, "t", max_classes=4) == [5, 2, 9, 1]  # ties by id
    with pytest.raises(ValueError, match=r"class 0 has one row; every probed class"):
        top_classes(labels, "t", max_classes=5)
    with pytest.raises(ValueError, match="needs at least 2"):
        top_classes(torch.zeros(5, dtype=torch.int64), "t")


def test_twenty_most_frequent_classes_at_most():
    labels = torch.arange(30).repeat_interleave(torch.arange(31, 1, -1))
    probe_set = build_probe_set({"t": labels})
    assert probe_set.tasks[0].classes == list(range(20))


# ---------------------------------------------------------------------------
# Label and group files


def test_every_label_format_reads_the_same_labels(tmp_path):
    values = np.array([3, 1, 2, 3], dtype=np.int32)
    np.save(tmp_path / "letter.npy", values)
    torch.save(torch.from_numpy(values), tmp_path / "letter.pt")
    save_file(
        {"letter": torch.from_numpy(values)}, str(tmp_path / "letter.safetensors")
    )
    np.savez(tmp_path / "labels.npz", letter=values, doc=np.arange(4))
    for name in ("letter.npy", "letter.pt", "letter.safetensors"):
        labels = load_labels(tmp_path / name, n_rows=4)
        assert list(labels) == ["letter"]
        assert labels["letter"].tolist() == [3, 1, 2, 3]
        assert labels["letter"].dtype == torch.int64
    both = load_labels(tmp_path / "labels.npz")
    assert sorted(both) == ["doc", "letter"]
    assert list(load_labels(f"{tmp_path}/labels.npz:letter")) == ["letter"]
    assert list(load_labels(tmp_path / "labels.npz", exclude=["doc"])) == ["letter"]
    assert load_groups(f"{tmp_path}/labels.npz:doc", 4).tolist() == [0, 1, 2, 3]
    # Whole-number floats are integers; bool is 0/1.
    np.save(tmp_path / "f.npy", np.array([1.0, 0.0]))
    assert load_labels(tmp_path / "f.npy")["f"].tolist() == [1, 0]
    np.save(tmp_path / "b.npy", np.array([True, False]))
    assert load_labels(tmp_path / "b.npy")["b"].tolist() == [1, 0]


def test_file_spec_names_columns_only_after_a_label_suffix():
    assert split_file_spec("a/b.npz:x,y")[1] == ["x", "y"]
    assert split_file_spec("c:/data/labels.npy")[1] is None
    assert split_file_spec("labels.npz")[1] is None


def test_bad_label_and_group_files_fail_with_a_clear_message(tmp_path):
    np.save(tmp_path / "short.npy", np.arange(3))
    with pytest.raises(
        ValueError, match=r"short.npy: 'short': 3 values; the activations have 4 rows"
    ):
        load_labels(tmp_path / "short.npy", n_rows=4)
    np.save(tmp_path / "half.npy", np.array([0.0, 0.5, 1.0]))
    with pytest.raises(
        ValueError, match=r"must be integers; row 1 holds 0.5 \(float64\)"
    ):
        load_labels(tmp_path / "half.npy")
    np.save(tmp_path / "nan.npy", np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="must be integers; row 1 holds nan"):
        load_labels(tmp_path / "nan.npy")
    np.save(tmp_path / "matrix.npy", np.zeros((3, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"shape \[3, 2\]; expected one value per row"):
        load_labels(tmp_path / "matrix.npy")
    np.savez(tmp_path / "cols.npz", a=np.arange(4), b=np.arange(4))
    with pytest.raises(ValueError, match="no column 'c'; found: a, b"):
        load_labels(f"{tmp_path}/cols.npz:c")
    with pytest.raises(ValueError, match="holds several arrays"):
        load_groups(tmp_path / "cols.npz")
    with pytest.raises(
        ValueError, match=r"groups: .*'a': 4 values; the activations have 5"
    ):
        load_groups(f"{tmp_path}/cols.npz:a", n_rows=5)
    with pytest.raises(ValueError, match="no such file"):
        load_labels(tmp_path / "missing.npy")
    (tmp_path / "labels.csv").write_text("1\n2\n")
    with pytest.raises(ValueError, match="unknown file type '.csv'"):
        load_labels(tmp_path / "labels.csv")
    with pytest.raises(ValueError, match=r"groups: 4 values; the activations have 3"):
        build_probe_set({"t": torch.tensor([0, 0, 1])}, torch.arange(4))
    with pytest.raises(ValueError, match="class 1 has one row"):
        build_probe_set({"t": torch.tensor([0, 0, 1])})
