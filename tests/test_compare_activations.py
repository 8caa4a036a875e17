"""``compare --activations``: SAELens activation caches and tensor files, offline."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sae_lens_sampled.benchmark import RunSpec, run_compare
from sae_lens_sampled.benchmark.activation_files import (
    CachedActivations,
    nonfinite_rows,
    open_activations,
)
from sae_lens_sampled.benchmark.activations import (
    EVAL_SEGMENTS,
    ActivationsSource,
    ShuffledBatches,
    read_batches,
    split_rows,
)
from sae_lens_sampled.benchmark.config import CompareConfig
from sae_lens_sampled.benchmark.metrics import evaluate_on_activations
from sae_lens_sampled.cli import main as cli_main
from tests.helpers import CONTEXT, D_MODEL, HOOK, tiny_model, token_dataset

N_SEQUENCES = 160  # 2,560 tokens of the tiny model
RUN_SETTINGS = {
    "runs": [RunSpec("batchtopk"), RunSpec("sampled", {"pool_factor": 4.0})],
    "k": 4,
    "d_sae": 64,
    "steps": 12,
    "batch_size": 128,
    "eval_samples": 512,
    "plots": False,
}
TIMING = ("train_seconds", "tokens_per_second")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Activations of the tiny random model cached by SAELens's CacheActivationsRunner."""
    import sae_lens.cache_activations_runner as cache_module
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig

    path = tmp_path_factory.mktemp("cache") / "activations"
    tokens = N_SEQUENCES * CONTEXT
    cfg = CacheActivationsRunnerConfig(
        dataset_path="",
        model_name="tiny-random",
        model_batch_size=8,
        hook_name=HOOK,
        d_in=D_MODEL,
        training_tokens=tokens,
        context_size=CONTEXT,
        new_cached_activations_path=str(path),
        dtype="float32",
        device="cpu",
        prepend_bos=False,
        streaming=False,
        # Two buffers; the runner's default (2 GB) would cache far more tokens.
        buffer_size_gb=tokens // 2 * D_MODEL * 4 / 1e9,
    )
    with pytest.MonkeyPatch.context() as patch:
        # The runner loads its model by name; hand it the tiny one (offline).
        patch.setattr(cache_module, "load_model", lambda *a, **k: tiny_model())
        CacheActivationsRunner(cfg, override_dataset=token_dataset()).run()
    return path


def cached_rows(cache_dir: Path) -> np.ndarray:
    """All tokens of the cache, row-major (sequence by sequence)."""
    import datasets

    dataset = datasets.load_from_disk(str(cache_dir)).with_format("numpy")
    return np.asarray(dataset[HOOK]).reshape(-1, D_MODEL)


@pytest.fixture(scope="module")
def tensor_files(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The cache's activations as .npy, .safetensors and .pt files."""
    rows = cached_rows(cache_dir)
    folder = tmp_path_factory.mktemp("files")
    paths = {
        "npy": folder / "acts.npy",
        "safetensors": folder / "acts.safetensors",
        "pt": folder / "acts.pt",
    }
    np.save(paths["npy"], rows)
    save_file({"acts": torch.from_numpy(rows)}, paths["safetensors"])
    torch.save(torch.from_numpy(rows), paths["pt"])
    return paths


def test_cache_runner_output_is_read_token_by_token(cache_dir):
    rows = cached_rows(cache_dir)
    assert rows.shape == (N_SEQUENCES * CONTEXT, D_MODEL)
    acts = open_activations(cache_dir)
    assert isinstance(acts, CachedActivations)
    assert (acts.n_rows, acts.d_in, acts.key, acts.dtype) == (
        N_SEQUENCES * CONTEXT,
        D_MODEL,
        HOOK,
        "float32",
    )
    # Ranges that start and end inside sequences.
    for start, stop in [(0, 5), (7, 40), (CONTEXT - 1, 3 * CONTEXT + 2)]:
        assert torch.equal(acts.read(start, stop), torch.from_numpy(rows[start:stop]))


def test_every_format_reads_the_same_rows(cache_dir, tensor_files):
    rows = torch.from_numpy(cached_rows(cache_dir))
    for kind, path in tensor_files.items():
        acts = open_activations(path)
        assert acts.format == kind
        assert (acts.n_rows, acts.d_in, acts.dtype) == (*rows.shape, "float32")
        assert torch.equal(acts.read(100, 357), rows[100:357])
        assert acts.sha256() == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", ["npy", "safetensors", "pt"])
def test_half_precision_files_read_as_their_float32_values(tmp_path, kind):
    data = torch.randn(300, 8)
    half = data.to(torch.bfloat16 if kind == "pt" else torch.float16)
    path = tmp_path / f"half.{kind}"
    if kind == "npy":
        np.save(path, half.numpy())
    elif kind == "safetensors":
        save_file({"x": half}, path)
    else:
        torch.save(half, path)
    acts = open_activations(path)
    assert acts.dtype == str(half.dtype).removeprefix("torch.")
    read = acts.read(10, 250)
    assert read.dtype == torch.float32
    assert torch.equal(read, half[10:250].float())


def test_split_rows_spreads_the_eval_split_and_trains_on_the_rest():
    eval_ranges, train_ranges = split_rows(10_000, 1_000)
    assert len(eval_ranges) == EVAL_SEGMENTS
    assert sum(b - a for a, b in eval_ranges) == 1_000
    assert sum(b - a for a, b in train_ranges) == 9_000
    covered = sorted(eval_ranges + train_ranges)
    # Disjoint, in order, covering every row; the last eval segment ends the file.
    assert covered[0][0] == 0 and covered[-1][1] == 10_000
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:], strict=False))
    assert eval_ranges[-1][1] == 10_000
    starts = [a for a, _ in eval_ranges]
    gaps = {b - a for a, b in zip(starts, starts[1:], strict=False)}
    assert gaps <= {624, 625, 626}  # evenly spaced
    # A split smaller than the segment count keeps one row per segment.
    eval_ranges, _ = split_rows(100, 3)
    assert [b - a for a, b in eval_ranges] == [1, 1, 1]
    with pytest.raises(ValueError, match=r"eval_rows must be in \[1, 99\], got 100"):
        split_rows(100, 100)


class IndexRows:
    """A stand-in file whose row i holds the value i (so rows can be traced)."""

    d_in = 2

    def __init__(self, n_rows: int):
        self.n_rows = n_rows

    def read(self, start: int, stop: int) -> torch.Tensor:
        return torch.arange(start, stop, dtype=torch.float32)[:, None].repeat(1, 2)


def test_shuffled_batches_visit_each_training_row_once_per_epoch():
    file = IndexRows(5_000)
    eval_ranges, train_ranges = split_rows(file.n_rows, 600)
    train = {i for a, b in train_ranges for i in range(a, b)}
    batch_size = 200  # 4,400 training rows = 22 batches
    stream = ShuffledBatches(file, train_ranges, batch_size, 0, buffer_rows=4_400)
    epoch = torch.cat([next(stream) for _ in range(22)])[:, 0].long().tolist()
    assert sorted(epoch) == sorted(train)
    assert epoch != sorted(epoch)  # shuffled
    # Seeded: the same seed gives the same stream, another seed another one.
    again = ShuffledBatches(file, train_ranges, batch_size, 0, buffer_rows=1_000)
    other = ShuffledBatches(file, train_ranges, batch_size, 1, buffer_rows=1_000)
    first = ShuffledBatches(file, train_ranges, batch_size, 0, buffer_rows=1_000)
    for _ in range(60):  # across epochs, with a buffer smaller than the data
        batch = next(first)
        assert torch.equal(batch, next(again))
        assert set(batch[:, 0].long().tolist()) <= train
    assert not torch.equal(next(first), next(other))
    # The eval split is read in order, batch by batch, remainder last.
    sizes = [len(b) for b in read_batches(file, eval_ranges, 256)]  # type: ignore[arg-type]
    assert sizes == [256, 256, 88]


def test_evaluate_on_activations_matches_saelens_synthetic_evaluator():
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.synthetic import SyntheticModel
    from sae_lens.synthetic.evals import eval_sae_on_synthetic_data

    from sae_lens_sampled.benchmark.synthetic import (
        ReplayedActivations,
        default_synthetic_model_config,
    )

    model = SyntheticModel(default_synthetic_model_config(0))
    features = [model.activation_generator.sample(n) for n in (256, 256, 100)]
    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=64, d_sae=96, k=5))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    expected = eval_sae_on_synthetic_data(
        sae, model.feature_dict, ReplayedActivations(features), 612, 256
    )
    got = evaluate_on_activations(sae, [model.feature_dict(f) for f in features])
    assert got["l0"] == pytest.approx(expected.sae_l0)
    assert got["explained_variance"] == pytest.approx(expected.explained_variance)
    assert got["dead_features"] == expected.dead_latents
    assert got["shrinkage"] == pytest.approx(expected.shrinkage)
    assert got["l0"] == pytest.approx(5.0)  # the batch rule keeps k per token


def metrics_of(payload: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in payload["results"]]


def test_a_cache_and_its_tensor_files_give_the_same_results(cache_dir, tensor_files):
    from_cache = run_compare(activations=str(cache_dir), output=None, **RUN_SETTINGS)
    assert from_cache["mode"] == "activations"
    data = from_cache["data"]
    assert data["format"] == "saelens_cache"
    assert data["shape"] == [N_SEQUENCES * CONTEXT, D_MODEL]
    assert (data["eval_rows"], data["train_rows"]) == (512, N_SEQUENCES * CONTEXT - 512)
    results = metrics_of(from_cache)
    assert [r["label"] for r in results] == ["batchtopk", "sampled:pool_factor=4.0"]
    for result in results:
        for name in ("mcc", "f1", "absorption", "ce_loss_score", "l0_calibrated"):
            assert result[name] is None
        assert 0 < result["l0"] <= 64
        assert result["l0_batch"] == pytest.approx(4.0)
        assert result["explained_variance"] <= 1
        assert 0 <= result["dead_features_batch"] <= 64
        assert result["training_tokens"] == 12 * 128
    for kind, path in tensor_files.items():
        payload = run_compare(activations=str(path), output=None, **RUN_SETTINGS)
        assert metrics_of(payload) == results, kind
        assert payload["data"]["format"] == kind
        assert (
            payload["data"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        )


@pytest.mark.parametrize(
    "normalize", ["expected_average_only_in", "covariance_whitening", "layer_norm"]
)
def test_normalisation_makes_results_independent_of_the_activation_scale(
    tmp_path, normalize
):
    rows = np.random.default_rng(0).standard_normal((2_560, 32)) + 3
    np.save(tmp_path / "x1.npy", rows.astype(np.float32))
    np.save(tmp_path / "x10.npy", (rows * 10).astype(np.float32))
    settings = {**RUN_SETTINGS, "runs": [RunSpec("batchtopk")], "output": None}

    def compare(name: str, normalize: str) -> dict:
        path = str(tmp_path / name)
        payload = run_compare(
            activations=path, normalize_activations=normalize, **settings
        )
        assert payload["config"]["normalize_activations"] == normalize
        return payload["results"][0]

    # SAELens scales (or whitens, or normalises) both files alike; the trainer folds
    # the statistics back into the SAE, which is evaluated on the raw rows.
    one, ten = compare("x1.npy", normalize), compare("x10.npy", normalize)
    for name in ("explained_variance", "explained_variance_batch"):
        assert one[name] == pytest.approx(ten[name], abs=1e-3), name
    # Rounding may flip a feature on a few of the 512 eval tokens.
    for name in ("l0", "l0_batch"):
        assert one[name] == pytest.approx(ten[name], abs=0.01), name
    # Without normalisation the scale changes what is learned.
    raw_one, raw_ten = compare("x1.npy", "none"), compare("x10.npy", "none")
    assert abs(raw_one["explained_variance"] - raw_ten["explained_variance"]) > 0.01


def write_npy(tmp_path: Path, array: np.ndarray) -> str:
    path = tmp_path / "acts.npy"
    np.save(path, array)
    return str(path)


def never_trains(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained before the file was checked")

    monkeypatch.setattr(ActivationsSource, "train", fail)


def test_bad_files_stop_before_training_with_a_clear_message(tmp_path, monkeypatch):
    never_trains(monkeypatch)
    good = np.random.default_rng(0).standard_normal((2_000, 8)).astype(np.float32)
    settings = {**RUN_SETTINGS, "batch_size": 128, "eval_samples": 200, "output": None}

    def compare_on(array: np.ndarray, **overrides: object) -> None:
        run_compare(activations=write_npy(tmp_path, array), **{**settings, **overrides})

    with pytest.raises(ValueError, match=r"shape \[2000, 2, 4\] \(rank 3\); expected"):
        compare_on(good.reshape(2_000, 2, 4))
    with pytest.raises(ValueError, match="holds int64 values; expected floating"):
        compare_on(np.arange(16_000, dtype=np.int64).reshape(2_000, 8))
    broken = good.copy()
    broken[3, 1] = np.nan
    broken[17] = np.inf
    broken[1_500, 7] = -np.inf
    with pytest.raises(
        ValueError, match=r"3 of 2,000 rows hold NaN or Inf values \(rows 3, 17, 1500\)"
    ):
        compare_on(broken)
    with pytest.raises(
        ValueError,
        match=r"2,000 rows; .* batch_size \+ eval_samples = 1,024 \+ 1,000 = 2,024",
    ):
        compare_on(good, batch_size=1_024, eval_samples=1_000)
    with pytest.raises(
        ValueError, match="sampled:d_in=16 sets d_in=16, but the activations data have"
    ):
        compare_on(good, runs=[RunSpec("topk"), RunSpec("sampled", {"d_in": 16})])


def test_nonfinite_scan_counts_rows_beyond_the_first_few(tmp_path):
    array = np.zeros((100, 4), dtype=np.float16)
    array[::10, 0] = np.nan
    count, first = nonfinite_rows(open_activations(write_npy(tmp_path, array)))
    assert (count, first) == (10, [0, 10, 20, 30, 40])


def test_tensor_names_and_formats_are_checked(tmp_path, cache_dir):
    several = tmp_path / "two.safetensors"
    save_file({"a": torch.zeros(4, 2), "b": torch.zeros(4, 2)}, several)
    with pytest.raises(ValueError, match=r"several tensors \(a, b\); name one with"):
        open_activations(several)
    assert open_activations(several, "b").key == "b"
    with pytest.raises(
        ValueError, match=r"no tensor named 'c' \(--hook\); found: a, b"
    ):
        open_activations(several, "c")
    pt = tmp_path / "d.pt"
    torch.save({"acts": torch.zeros(4, 2), "step": 3}, pt)
    assert open_activations(pt).key == "acts"
    with pytest.raises(ValueError, match="no activation column named 'nope'"):
        open_activations(cache_dir, "nope")
    with pytest.raises(ValueError, match="unknown file type '.csv'"):
        (tmp_path / "x.csv").write_text("1,2\n")
        open_activations(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="not a dataset saved by SAELens"):
        open_activations(tmp_path)
    with pytest.raises(ValueError, match="no such file or directory"):
        open_activations(tmp_path / "missing.npy")
    (tmp_path / "junk.safetensors").write_bytes(b"not a header")
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        open_activations(tmp_path / "junk.safetensors")


@pytest.mark.parametrize(
    "claimed", [[CONTEXT, 2 * D_MODEL], [CONTEXT // 2, 2 * D_MODEL]]
)
def test_a_cache_whose_metadata_claims_another_row_shape_is_refused(
    tmp_path, cache_dir, claimed
):
    # Another element count, and the same count split differently: either would be
    # reshaped into wrong tokens without the check.
    copy = tmp_path / "activations"
    shutil.copytree(cache_dir, copy)
    info_path = copy / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["features"][HOOK]["shape"] = claimed
    info_path.write_text(json.dumps(info))
    real = f"row 0 holds [{CONTEXT}, {D_MODEL}] ({CONTEXT * D_MODEL} values)"
    with pytest.raises(ValueError, match=re.escape(real)) as raised:
        open_activations(copy)
    assert f"holds {claimed} ({claimed[0] * claimed[1]} values) per row" in str(
        raised.value
    )


def test_default_eval_split_is_a_tenth_of_the_rows(tmp_path):
    path = write_npy(tmp_path, np.ones((2_345, 4), dtype=np.float32))
    source = ActivationsSource(CompareConfig(activations=path, batch_size=64))
    assert source.eval_samples == 234
    assert source.describe()["train_rows"] == 2_345 - 234


def test_activations_and_model_are_exclusive():
    with pytest.raises(ValueError, match="model and activations are exclusive"):
        CompareConfig(activations="x.npy", model="pythia-160m", hook="h")


def test_cli_compare_on_activations(tmp_path, tensor_files, capsys):
    out = tmp_path / "out"
    argv = ["compare", "--activations", str(tensor_files["npy"]), "--output", str(out)]
    argv += ["--architectures", "topk", "--k", "2", "--d-sae", "16", "--steps", "3"]
    argv += ["--batch-size", "64", "--eval-samples", "256", "--no-plots"]
    assert cli_main(argv) == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["mode"] == "activations"
    assert saved["config"]["eval_samples"] == 256
    assert saved["results"][0]["l0"] <= 2
    assert "eval split 256 rows" in capsys.readouterr().out
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((10, 2, 2), dtype=np.float32))
    assert cli_main(["compare", "--activations", str(bad)]) == 2
    assert "(rank 3); expected [n_tokens, d_in]" in capsys.readouterr().err
