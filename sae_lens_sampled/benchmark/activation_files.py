"""Activation files for ``compare --activations``, read without loading them whole.

A SAELens ``CacheActivationsRunner`` directory, ``.npy``, ``.safetensors`` or
``.pt``/``.pth`` (``docs/compare.md``, "Your own activations"); each is checked for
shape and dtype when opened, and reads return float32 ``[rows, d_in]`` tensors.
"""

from __future__ import annotations

import hashlib
import math
import pickle
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Rows per read when streaming through a whole file.
SCAN_ROWS = 65_536

# safetensors dtype names that hold floating-point values.
_SAFETENSORS_FLOATS = {
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
}


def _error(path: Path, message: str) -> ValueError:
    return ValueError(f"activations: {path}: {message}")


def _pick(path: Path, names: list[str], key: str | None, what: str) -> str:
    """The tensor or column named ``key``, or the only one when ``key`` is None."""
    if key is not None:
        if key not in names:
            raise _error(
                path, f"no {what} named {key!r} (--hook); found: {', '.join(names)}"
            )
        return key
    if len(names) == 1:
        return names[0]
    if not names:
        raise _error(path, f"holds no {what} of activations")
    raise _error(
        path,
        f"holds several {what}s ({', '.join(names)}); name one with --hook",
    )


class ActivationFile(ABC):
    """Rows ``[n_rows, d_in]`` of floating-point activations on disk: ``format`` is
    ``saelens_cache``, ``npy``, ``safetensors`` or ``pt``; ``key`` the column or
    tensor read (None for ``.npy`` and lone tensors); ``dtype`` the stored one's name.
    """

    path: Path
    format: str
    key: str | None
    n_rows: int
    d_in: int
    dtype: str

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 2:
            raise _error(
                self.path,
                f"has shape {list(shape)} (rank {len(shape)}); expected "
                "[n_tokens, d_in] (rank 2)",
            )
        self.n_rows, self.d_in = int(shape[0]), int(shape[1])
        if self.n_rows == 0 or self.d_in == 0:
            raise _error(self.path, f"is empty (shape {list(shape)})")

    def _check_float(self, is_float: bool) -> None:
        if not is_float:
            raise _error(
                self.path,
                f"holds {self.dtype} values; expected floating-point activations "
                "(float16, bfloat16, float32 or float64)",
            )

    @abstractmethod
    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` as a float32 tensor."""

    def data_files(self) -> list[Path]:
        """The files whose bytes hold the activations, in reading order."""
        return [self.path]

    def sha256(self) -> str:
        """SHA-256 of :meth:`data_files`' bytes, concatenated in order."""
        digest = hashlib.sha256()
        for file in self.data_files():
            with open(file, "rb") as handle:
                while chunk := handle.read(1 << 22):
                    digest.update(chunk)
        return digest.hexdigest()


class NumpyFile(ActivationFile):
    format = "npy"

    def __init__(self, path: Path, key: str | None):
        self.path, self.key = path, None
        if key is not None:
            raise _error(path, f"a .npy file holds one array; got --hook {key!r}")
        try:
            self._array = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as error:  # e.g. object arrays
            raise _error(path, f"cannot be memory-mapped by numpy ({error})") from None
        self.dtype = str(self._array.dtype)
        self._check_shape(self._array.shape)
        self._check_float(np.issubdtype(self._array.dtype, np.floating))

    def read(self, start: int, stop: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self._array[start:stop], dtype=np.float32))


class SafetensorsFile(ActivationFile):
    format = "safetensors"

    def __init__(self, path: Path, key: str | None):
        from safetensors import SafetensorError, safe_open

        self.path = path
        try:
            self._handle = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as error:
            raise _error(
                path, f"is not a readable safetensors file ({error})"
            ) from None
        self.key = _pick(path, sorted(self._handle.keys()), key, "tensor")
        self._slice = self._handle.get_slice(self.key)
        stored = self._slice.get_dtype()
        self.dtype = _SAFETENSORS_FLOATS.get(stored, stored)
        self._check_shape(tuple(self._slice.get_shape()))
        self._check_float(stored in _SAFETENSORS_FLOATS)

    def read(self, start: int, stop: int) -> torch.Tensor:
        rows: torch.Tensor = self._slice[start:stop]
        return rows.to(torch.float32)


class TorchFile(ActivationFile):
    format = "pt"

    def __init__(self, path: Path, key: str | None):
        self.path = path
        try:
            loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, OSError, EOFError) as error:
            raise _error(
                path,
                f"cannot be memory-mapped by torch.load ({error}); save it with "
                "torch.save (zip format, the default since torch 1.6)",
            ) from None
        if isinstance(loaded, torch.Tensor):
            if key is not None:
                raise _error(path, f"holds one tensor; got --hook {key!r}")
            self.key, tensor = None, loaded
        elif isinstance(loaded, dict):
            names = sorted(k for k, v in loaded.items() if isinstance(v, torch.Tensor))
            self.key = _pick(path, names, key, "tensor")
            tensor = loaded[self.key]
        else:
            raise _error(
                path, f"holds a {type(loaded).__name__}; expected a tensor or a dict"
            )
        self._tensor = tensor
        self.dtype = str(tensor.dtype).removeprefix("torch.")
        self._check_shape(tuple(tensor.shape))
        self._check_float(tensor.is_floating_point())

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self._tensor[start:stop].to(torch.float32)


class CachedActivations(ActivationFile):
    """A dataset saved by SAELens's ``CacheActivationsRunner``.

    Each row holds one sequence, ``[context, d_in]`` in the hook's column; token
    ``i`` is position ``i % context`` of row ``i // context``.
    """

    format = "saelens_cache"

    def __init__(self, path: Path, key: str | None):
        import datasets

        self.path = path
        try:
            dataset: Any = datasets.load_from_disk(str(path))
        except FileNotFoundError as error:
            raise _error(
                path,
                "is not a dataset saved by SAELens's CacheActivationsRunner "
                f"(datasets.load_from_disk: {error})",
            ) from None
        if not isinstance(dataset, datasets.Dataset):
            raise _error(path, "holds several splits; expected one cached dataset")
        features = dataset.features
        arrays = [
            name
            for name, feature in features.items()
            if isinstance(feature, datasets.Array2D | datasets.Array3D)
        ]
        self.key = _pick(path, sorted(arrays), key, "activation column")
        feature = features[self.key]
        self.dtype = feature.dtype
        self._check_float(np.issubdtype(np.dtype(feature.dtype), np.floating))
        per_row = tuple(feature.shape)
        if len(per_row) != 2:
            raise _error(
                path,
                f"column {self.key!r} holds {list(per_row)} per row; expected "
                "[context, d_in]",
            )
        self.context = per_row[0]
        self._check_shape((len(dataset) * self.context, per_row[1]))
        self._rows = dataset.with_format("numpy", columns=[self.key])
        # Rows are read by the shape dataset_info.json claims; a wrong claim with
        # another element count (or another split of it) would be reshaped silently.
        row = np.asarray(self._rows[0][self.key])
        if tuple(row.shape) != per_row:
            raise _error(
                path,
                f"dataset_info.json says column {self.key!r} holds {list(per_row)} "
                f"({math.prod(per_row)} values) per row, but row 0 holds "
                f"{list(row.shape)} ({row.size} values); the metadata does not "
                "describe the data: restore its dataset_info.json or cache the "
                "activations again",
            )
        self._files = [Path(f["filename"]) for f in dataset.cache_files]

    def read(self, start: int, stop: int) -> torch.Tensor:
        first, last = start // self.context, -(-stop // self.context)
        block = self._rows[first:last][self.key].reshape(-1, self.d_in)
        offset = first * self.context
        rows = block[start - offset : stop - offset]
        return torch.from_numpy(np.array(rows, dtype=np.float32))

    def data_files(self) -> list[Path]:
        return self._files


FILE_TYPES: dict[str, Callable[[Path, str | None], ActivationFile]] = {
    ".npy": NumpyFile,
    ".safetensors": SafetensorsFile,
    ".pt": TorchFile,
    ".pth": TorchFile,
}
TENSOR_SUFFIXES: tuple[str, ...] = tuple(FILE_TYPES)


def open_activations(path: str | Path, key: str | None = None) -> ActivationFile:
    """Open ``path`` (a SAELens activation cache or a tensor file), checked: a
    ValueError names a missing path, an unknown suffix, a bad shape or dtype."""
    path = Path(path)
    if path.is_dir():
        return CachedActivations(path, key)
    if not path.exists():
        raise _error(path, "no such file or directory")
    suffix = path.suffix.lower()
    if suffix in FILE_TYPES:
        return FILE_TYPES[suffix](path, key)
    raise _error(
        path,
        f"unknown file type {suffix or '(none)'!r}; expected a directory written by "
        f"SAELens's CacheActivationsRunner or one of {', '.join(TENSOR_SUFFIXES)}",
    )


def nonfinite_rows(file: ActivationFile, limit: int = 5) -> tuple[int, list[int]]:
    """How many rows hold a NaN or Inf (after conversion to float32), and the
    first ``limit`` of them. Streams through the whole file."""
    count = 0
    first: list[int] = []
    for start in range(0, file.n_rows, SCAN_ROWS):
        rows = file.read(start, min(start + SCAN_ROWS, file.n_rows))
        bad = (~torch.isfinite(rows).all(dim=1)).nonzero().flatten()
        count += int(bad.numel())
        if len(first) < limit:
            first.extend(start + int(i) for i in bad[: limit - len(first)])
    return count, first
