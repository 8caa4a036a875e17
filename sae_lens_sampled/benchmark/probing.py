"""Sparse probing: how well do a few latents of an SAE predict a label?

One-vs-rest logistic-regression probes on the ``k`` latents of largest train mean
difference, for each ``k`` of ``K_PROBE``, scored by balanced accuracy on a stratified
eval split, with raw-activation and random-direction baselines; ``docs/compare.md``
("Sparse probing") defines each step. Pure torch; :func:`probe_encoder` streams the
rows in two passes, so no ``[rows, d_sae]`` matrix is ever held.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

K_PROBE: tuple[int, ...] = (1, 2, 5, 20)
MAX_CLASSES = 20
EVAL_FRACTION = 0.2
# sklearn's 1 / C: the L2 penalty 0.5 * L2 * ||w||^2 is added to the summed loss.
L2_PENALTY = 1.0
# Result keys of the mean balanced accuracy per k (the table's columns).
PROBE_METRICS: tuple[str, ...] = tuple(f"probe_k{k}" for k in K_PROBE)
ALL_DIMS = "all"

LABEL_SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".safetensors")


# ---------------------------------------------------------------------------
# Label and group files


def split_file_spec(spec: str | Path) -> tuple[Path, list[str] | None]:
    """``PATH`` or ``PATH:NAME[,NAME...]`` (columns of a file holding several)."""
    text = str(spec)
    head, colon, tail = text.rpartition(":")
    if colon and head.lower().endswith(LABEL_SUFFIXES) and tail:
        return Path(head), [name.strip() for name in tail.split(",")]
    return Path(text), None


def read_columns(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The named 1-D columns of a ``.npy``/``.npz``/``.pt``/``.safetensors`` file;
    a lone array is named after the file."""
    import numpy as np

    if not path.is_file():
        raise ValueError(f"{what}: {path}: no such file")
    suffix = path.suffix.lower()
    loaded: Any
    if suffix == ".npy":
        loaded = np.load(path, allow_pickle=False)
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            loaded = {name: archive[name] for name in archive.files}
    elif suffix in (".pt", ".pth"):
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        loaded = load_file(str(path))
    else:
        raise ValueError(
            f"{what}: {path}: unknown file type {suffix or '(none)'!r}; expected one "
            f"of {', '.join(LABEL_SUFFIXES)}"
        )
    if not isinstance(loaded, dict):
        loaded = {path.stem: loaded}
    columns = {}
    for name, values in loaded.items():
        tensor = torch.as_tensor(values) if isinstance(values, np.ndarray) else values
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{what}: {path}: {name!r} is not an array")
        columns[str(name)] = tensor
    if not columns:
        raise ValueError(f"{what}: {path}: holds no arrays")
    return columns


def integer_column(
    values: torch.Tensor, where: str, n_rows: int | None = None
) -> torch.Tensor:
    """``values`` (one per row) as int64; floats only when every value is whole."""
    if values.dim() != 1:
        raise ValueError(
            f"{where}: shape {list(values.shape)}; expected one value per row (rank 1)"
        )
    if values.is_floating_point():
        whole = torch.isfinite(values) & (values == values.round())
        if not bool(whole.all()):
            row = int((~whole).nonzero()[0])
            raise ValueError(
                f"{where}: labels and group ids must be integers; row {row} holds "
                f"{values[row].item()} ({str(values.dtype).removeprefix('torch.')})"
            )
    elif values.is_complex():
        raise ValueError(f"{where}: labels and group ids must be integers, got complex")
    _check_rows(values, n_rows, where)
    return values.to(torch.int64)


def _check_rows(values: torch.Tensor, n_rows: int | None, where: str) -> None:
    if n_rows is not None and values.shape[0] != n_rows:
        raise ValueError(
            f"{where}: {values.shape[0]:,} values; the activations have {n_rows:,} "
            "rows (one value per row)"
        )


def load_labels(
    spec: str | Path, n_rows: int | None = None, exclude: Sequence[str] = ()
) -> dict[str, torch.Tensor]:
    """Label tasks ``name -> int64 [n_rows]`` from ``PATH[:NAME,...]``.

    A ``.npy``, or a ``.pt``/``.safetensors`` holding one tensor, is one task named
    after the file; a ``.npz`` (or a dict of tensors) is one task per column, or
    the columns named after ``:``. ``exclude`` drops columns (the group ids when
    they come from the same file).
    """
    path, names = split_file_spec(spec)
    columns = read_columns(path, "labels")
    if names is not None:
        missing = [name for name in names if name not in columns]
        if missing:
            raise ValueError(
                f"labels: {path}: no column {missing[0]!r}; found: {', '.join(columns)}"
            )
        columns = {name: columns[name] for name in names}
    else:
        columns = {k: v for k, v in columns.items() if k not in exclude}
    return {
        name: integer_column(values, f"labels: {path}: {name!r}", n_rows)
        for name, values in columns.items()
    }


def load_groups(spec: str | Path, n_rows: int | None = None) -> torch.Tensor:
    """Group ids int64 ``[n_rows]`` from ``PATH[:NAME]`` (``NAME`` when the file
    holds several arrays)."""
    path, names = split_file_spec(spec)
    columns = read_columns(path, "groups")
    if names is None:
        if len(columns) != 1:
            raise ValueError(
                f"groups: {path}: holds several arrays ({', '.join(columns)}); name "
                f"one as {path}:NAME"
            )
        names = list(columns)
    if len(names) != 1 or names[0] not in columns:
        raise ValueError(
            f"groups: {path}: name one array of: {', '.join(columns)}; got "
            f"{','.join(names)}"
        )
    return integer_column(columns[names[0]], f"groups: {path}: {names[0]!r}", n_rows)


# ---------------------------------------------------------------------------
# Units (rows or groups), classes and the split


def group_units(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``unit_of_row`` (0 .. n_groups - 1, in order of group id) and rows per group."""
    _, unit_of_row, sizes = torch.unique(
        groups, return_inverse=True, return_counts=True
    )
    return unit_of_row, sizes


def unit_labels(
    labels: torch.Tensor, unit_of_row: torch.Tensor, n_units: int, task: str
) -> torch.Tensor:
    """The label of each unit; raises ValueError when a unit's rows disagree."""
    first = torch.zeros(n_units, dtype=torch.int64)
    first[unit_of_row] = labels  # one of each unit's labels
    mixed = labels != first[unit_of_row]
    if bool(mixed.any()):
        row = int(mixed.nonzero()[0])
        unit = int(unit_of_row[row])
        found = torch.unique(labels[unit_of_row == unit])[:5].tolist()
        raise ValueError(
            f"labels: task {task!r}: the rows of one group hold different labels "
            f"(group #{unit}, labels {found}); with --groups every row of a group "
            "needs the group's label (name the columns to probe as PATH:NAME)"
        )
    return first


def top_classes(
    labels: torch.Tensor, task: str, max_classes: int = MAX_CLASSES, unit: str = "row"
) -> list[int]:
    """The most frequent classes (at most ``max_classes``; ties by class id), each
    with two members at least (one for training, one for evaluation)."""
    classes, counts = torch.unique(labels, return_counts=True)
    if classes.numel() < 2:
        raise ValueError(
            f"labels: task {task!r}: {classes.numel()} class; a one-vs-rest probe "
            "needs at least 2"
        )
    # Stable sort by descending count keeps ascending class ids among ties.
    order = torch.sort(-counts, stable=True).indices[:max_classes]
    chosen = classes[order]
    lonely = counts[order] < 2
    if bool(lonely.any()):
        name = int(chosen[lonely][0])
        raise ValueError(
            f"labels: task {task!r}: class {name} has one {unit}; every probed class "
            f"(the {max_classes} most frequent) needs at least 2, one for training "
            "and one for evaluation"
        )
    return [int(c) for c in chosen]


def split_train(
    labels: torch.Tensor, eval_fraction: float = EVAL_FRACTION, seed: int = 0
) -> torch.Tensor:
    """Train mask over units, stratified by label and drawn from ``seed``: each class
    of n >= 2 members puts round(eval_fraction * n) of them (at least 1, at most
    n - 1) in eval; a class of one member stays in train."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    generator = torch.Generator().manual_seed(seed)
    train = torch.ones(labels.shape[0], dtype=torch.bool)
    for value in torch.unique(labels):
        members = (labels == value).nonzero().flatten()
        n = members.numel()
        if n < 2:
            continue
        n_eval = min(max(round(eval_fraction * n), 1), n - 1)
        shuffled = members[torch.randperm(n, generator=generator)]
        train[shuffled[:n_eval]] = False
    return train


# ---------------------------------------------------------------------------
# Latent selection


def contrast_weights(
    labels: torch.Tensor, train: torch.Tensor, classes: Sequence[int]
) -> torch.Tensor:
    """``[n_units, C]``: ``weights.T @ features`` is mean(class) - mean(rest) over the
    train units, per class."""
    positive = (labels.unsqueeze(1) == torch.tensor(list(classes))) & train.unsqueeze(1)
    negative = ~positive & train.unsqueeze(1)
    pos = positive.to(torch.float64)
    neg = negative.to(torch.float64)
    return pos / pos.sum(0).clamp_min(1) - neg / neg.sum(0).clamp_min(1)


def mean_differences(
    features: torch.Tensor,
    labels: torch.Tensor,
    train: torch.Tensor,
    classes: Sequence[int],
) -> torch.Tensor:
    """``[C, F]``: mean(class) - mean(rest) of each feature over the train units."""
    return contrast_weights(labels, train, classes).T @ features.to(torch.float64)


def top_latents(differences: torch.Tensor, k: int) -> torch.Tensor:
    """``[C, k]``: the ``k`` features of largest ``|difference|`` per class, largest
    first (so the first j of them are the top j)."""
    return differences.abs().topk(min(k, differences.shape[1]), dim=1).indices


# ---------------------------------------------------------------------------
# Logistic regression


@dataclass
class LogisticProbe:
    """A fitted probe: ``logit = ((x - mean) / scale) @ weight + bias``, with the
    train mean and standard deviation (1 where an input is constant) per input."""

    weight: torch.Tensor
    bias: float
    mean: torch.Tensor
    scale: torch.Tensor

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.to(torch.float64) - self.mean) / self.scale
        return z @ self.weight + self.bias > 0


def balanced_weights(y: torch.Tensor) -> torch.Tensor:
    """Sample weights n / (2 n_class): each class carries half of the loss."""
    n = y.numel()
    n_pos = int(y.sum())
    if not 0 < n_pos < n:
        raise ValueError(
            f"a probe needs positive and negative train examples, got {n_pos} of {n}"
        )
    return torch.where(y, n / (2 * n_pos), n / (2 * (n - n_pos))).to(torch.float64)


def fit_logistic_regression(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    l2: float = L2_PENALTY,
    balanced: bool = True,
    max_iter: int = 500,
) -> LogisticProbe:
    """L2-regularised logistic regression, full-batch L-BFGS in float64.

    Minimises ``sum_i s_i * log_loss_i + 0.5 * l2 * ||w||^2`` over the weights on
    standardised inputs and an unpenalised intercept: scikit-learn's
    ``LogisticRegression(C=1 / l2)`` on standardised inputs, with
    ``class_weight="balanced"`` when ``balanced`` (``s_i = n / (2 n_class)``,
    otherwise 1); ``x`` ``[n, F]``, ``y`` ``[n]`` bool.
    """
    x64 = x.to(torch.float64)
    target = y.to(torch.bool)
    mean, std = x64.mean(0), x64.std(0, unbiased=False)
    scale = torch.where(std > 1e-12, std, torch.ones_like(std))
    z = (x64 - mean) / scale
    n, width = z.shape
    weights = balanced_weights(target) if balanced else torch.ones(n, dtype=x64.dtype)
    targets = target.to(torch.float64)
    params = torch.zeros(width + 1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [params],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-8,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        logits = z @ params[:width] + params[width]
        # log(1 + e^logit) - y * logit; binary_cross_entropy_with_logits is far
        # slower in float64 on CPU.
        losses = torch.logaddexp(torch.zeros_like(logits), logits) - targets * logits
        # Divided by n so the tolerances do not depend on the data size.
        loss = ((weights * losses).sum() + 0.5 * l2 * params[:width].square().sum()) / n
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    fitted = params.detach()
    return LogisticProbe(fitted[:width].clone(), float(fitted[width]), mean, scale)


def accuracy(predicted: torch.Tensor, target: torch.Tensor) -> float:
    return float((predicted == target).to(torch.float64).mean())


def balanced_accuracy(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """Mean of the accuracy on the positives and on the negatives."""
    hits = (predicted == target).to(torch.float64)
    return 0.5 * float(hits[target].mean() + hits[~target].mean())


# ---------------------------------------------------------------------------
# Probe sets and probing


@dataclass
class ProbeTask:
    """One label column over the units: ``labels`` int64 and ``train`` (True for
    the train split) ``[n_units]``, and the probed classes, most frequent first."""

    name: str
    labels: torch.Tensor
    train: torch.Tensor
    classes: list[int]

    def describe(self) -> dict[str, Any]:
        counts = [int((self.labels == c).sum()) for c in self.classes]
        return {
            "classes": self.classes,
            "class_units": counts,
            "train_units": int(self.train.sum()),
            "eval_units": int((~self.train).sum()),
        }


@dataclass
class ProbeSet:
    """Label tasks over the units (rows, or groups of rows when ``grouped``) of an
    activations file: ``unit_of_row`` ``[n_rows]`` is the unit each row is pooled
    into, ``sizes`` ``[n_units]`` the rows per unit."""

    tasks: list[ProbeTask]
    unit_of_row: torch.Tensor
    sizes: torch.Tensor
    grouped: bool

    @property
    def n_rows(self) -> int:
        return int(self.unit_of_row.shape[0])

    @property
    def n_units(self) -> int:
        return int(self.sizes.shape[0])

    def describe(self) -> dict[str, Any]:
        return {
            "units": "groups" if self.grouped else "rows",
            "n_rows": self.n_rows,
            "n_units": self.n_units,
            "tasks": {task.name: task.describe() for task in self.tasks},
        }


def build_probe_set(
    labels: Mapping[str, torch.Tensor],
    groups: torch.Tensor | None = None,
    *,
    seed: int = 0,
    eval_fraction: float = EVAL_FRACTION,
    max_classes: int = MAX_CLASSES,
) -> ProbeSet:
    """Units, labels per unit, classes and the train/eval split of every task."""
    if not labels:
        raise ValueError("labels: no label task to probe")
    n_rows = next(iter(labels.values())).shape[0]
    for name, values in labels.items():
        _check_rows(values, n_rows, f"labels: {name!r}")
    if groups is not None:
        _check_rows(groups, n_rows, "groups")
        unit_of_row, sizes = group_units(groups)
    else:
        unit_of_row = torch.arange(n_rows)
        sizes = torch.ones(n_rows, dtype=torch.int64)
    n_units = int(sizes.shape[0])
    unit = "group" if groups is not None else "row"
    tasks = []
    for name, values in labels.items():
        per_unit = unit_labels(values, unit_of_row, n_units, name)
        classes = top_classes(per_unit, name, max_classes, unit)
        if len(torch.unique(per_unit)) == 2:
            # Two classes: one probe (the other one-vs-rest probe is its mirror).
            classes = classes[:1]
        tasks.append(
            ProbeTask(
                name, per_unit, split_train(per_unit, eval_fraction, seed), classes
            )
        )
    return ProbeSet(tasks, unit_of_row, sizes, groups is not None)


def probe_selected(
    task: ProbeTask,
    selected: torch.Tensor,
    columns: torch.Tensor,
    k_values: Sequence[int] = K_PROBE,
    l2: float = L2_PENALTY,
) -> dict[str, Any]:
    """Probes of ``task`` on its top latents ``selected`` ``[C, k_max]`` (per class,
    largest mean difference first); ``columns`` ``[n_units, C, k_max]`` holds their
    values: ``columns[:, c, j]`` is latent ``selected[c, j]`` on every unit."""
    per_k = {
        str(k): probe_classes(task, columns[..., :k].unbind(1), l2) for k in k_values
    }
    return {"latents": selected.tolist(), "k": per_k}


def probe_classes(
    task: ProbeTask, inputs: Sequence[torch.Tensor], l2: float = L2_PENALTY
) -> dict[str, Any]:
    """One probe per class of ``task`` on ``inputs[c]`` ``[n_units, F]``: the
    balanced and plain accuracies on the eval split."""
    train = task.train
    balanced, plain = [], []
    for x, value in zip(inputs, task.classes, strict=True):
        y = task.labels == value
        probe = fit_logistic_regression(x[train], y[train], l2=l2)
        predicted = probe.predict(x[~train])
        balanced.append(balanced_accuracy(predicted, y[~train]))
        plain.append(accuracy(predicted, y[~train]))
    return {
        "balanced_accuracy": balanced,
        "accuracy": plain,
        "mean_balanced_accuracy": statistics.fmean(balanced),
        "mean_accuracy": statistics.fmean(plain),
    }


def probe_features(
    features: torch.Tensor,
    probe_set: ProbeSet,
    k_values: Sequence[int] = K_PROBE,
    all_dims: bool = False,
) -> dict[str, Any]:
    """Every task's probes on unit features ``[n_units, F]`` held in memory."""
    tasks = {}
    for task in probe_set.tasks:
        differences = mean_differences(features, task.labels, task.train, task.classes)
        selected = top_latents(differences, max(k_values))
        result = probe_selected(task, selected, features[:, selected], k_values)
        if all_dims:  # every feature at once: the raw ceiling
            classes = len(task.classes)
            result["k"][ALL_DIMS] = probe_classes(task, [features] * classes)
        tasks[task.name] = result
    return summarize_tasks(tasks)


def summarize_tasks(tasks: dict[str, Any]) -> dict[str, Any]:
    """``tasks`` with ``mean``: per k, the mean over tasks of the mean balanced
    accuracy over classes."""
    keys = list(next(iter(tasks.values()))["k"])
    mean = {
        key: statistics.fmean(
            t["k"][key]["mean_balanced_accuracy"] for t in tasks.values()
        )
        for key in keys
    }
    return {"tasks": tasks, "mean": mean}


def table_fields(probes: Mapping[str, Any] | None) -> dict[str, float | None]:
    """``probe_k<k>``: the mean balanced accuracy per k (None when not probed)."""
    mean = probes["mean"] if probes else {}
    return {f"probe_k{k}": mean.get(str(k)) for k in K_PROBE}


# ---------------------------------------------------------------------------
# Streaming over the rows of a file


Batches = Callable[[], Iterable[torch.Tensor]]


@torch.no_grad()
def probe_encoder(
    encode: Callable[[torch.Tensor], torch.Tensor],
    batches: Batches,
    probe_set: ProbeSet,
    k_values: Sequence[int] = K_PROBE,
) -> dict[str, Any]:
    """Every task's probes on ``encode``'s latents, in two passes over the rows.

    ``batches()`` yields the rows in order, each pass anew. Pass 1 sums the
    contrast weights of each row (its unit's, divided by the unit's size) times its
    latents, which is the train mean difference of the pooled latents; pass 2 pools
    only the selected latents into the units.
    """
    per_task = [
        contrast_weights(task.labels, task.train, task.classes)
        for task in probe_set.tasks
    ]
    unit_weights = torch.cat(per_task, dim=1) / probe_set.sizes.unsqueeze(1)
    row_weights = unit_weights[probe_set.unit_of_row]
    differences: torch.Tensor | None = None
    for rows, batch in _spans(batches(), probe_set):
        latents = encode(batch).to(torch.float64)
        part = row_weights[rows].to(latents.device).T @ latents
        differences = part if differences is None else differences + part
    assert differences is not None
    counts = [len(task.classes) for task in probe_set.tasks]
    selected = [
        top_latents(part, max(k_values)) for part in differences.cpu().split(counts)
    ]
    wanted, position = torch.unique(
        torch.cat([s.flatten() for s in selected]), return_inverse=True
    )

    def wanted_codes() -> Iterator[torch.Tensor]:
        for batch in batches():
            codes = encode(batch)
            yield codes[:, wanted.to(codes.device)]

    pooled = _mean_pool(wanted_codes(), probe_set)
    positions = position.split([chosen.numel() for chosen in selected])
    tasks = {}
    for task, chosen, where in zip(probe_set.tasks, selected, positions, strict=True):
        columns = pooled[:, where.view(chosen.shape)]
        tasks[task.name] = probe_selected(task, chosen, columns, k_values)
    return summarize_tasks(tasks)


def _spans(
    batches: Iterable[torch.Tensor], probe_set: ProbeSet
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Each batch with the slice of rows it holds; all rows must be the labels'."""
    start = 0
    for batch in batches:
        yield slice(start, start + batch.shape[0]), batch
        start += batch.shape[0]
    if start != probe_set.n_rows:
        raise ValueError(
            f"probing read {start:,} activation rows; the labels have "
            f"{probe_set.n_rows:,}"
        )


@torch.no_grad()
def pool_rows(batches: Batches, probe_set: ProbeSet) -> torch.Tensor:
    """The activations mean-pooled into units, ``[n_units, d_in]`` float64."""
    return _mean_pool(batches(), probe_set)


def _mean_pool(batches: Iterable[torch.Tensor], probe_set: ProbeSet) -> torch.Tensor:
    """The mean over each unit's rows of ``batches`` (every row, in order), float64."""
    pooled: torch.Tensor | None = None
    for rows, batch in _spans(batches, probe_set):
        values = batch.to(torch.float64).cpu()
        if pooled is None:
            pooled = torch.zeros(
                probe_set.n_units, values.shape[1], dtype=torch.float64
            )
        pooled.index_add_(0, probe_set.unit_of_row[rows], values)
    assert pooled is not None
    return pooled / probe_set.sizes.unsqueeze(1)


def random_directions(d_in: int, n: int, seed: int) -> torch.Tensor:
    """``[d_in, n]`` unit columns, Gaussian directions drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(d_in, n, generator=generator, dtype=torch.float64)
    unit: torch.Tensor = directions / directions.norm(dim=0, keepdim=True)
    return unit


def probe_random_directions(
    pooled: torch.Tensor,
    probe_set: ProbeSet,
    n_directions: int,
    seed: int,
    k_values: Sequence[int] = K_PROBE,
) -> dict[str, Any]:
    """Probes on the pooled activations projected onto ``n_directions`` random
    unit directions. Projection is linear, so mean differences and pooling are
    taken on the activations and projected: no ``[n_units, n_directions]`` matrix."""
    directions = random_directions(pooled.shape[1], n_directions, seed)
    tasks = {}
    for task in probe_set.tasks:
        raw = mean_differences(pooled, task.labels, task.train, task.classes)
        selected = top_latents(raw @ directions, max(k_values))
        columns = pooled @ directions[:, selected.flatten()]
        columns = columns.view(pooled.shape[0], *selected.shape)
        tasks[task.name] = probe_selected(task, selected, columns, k_values)
    return summarize_tasks(tasks)
