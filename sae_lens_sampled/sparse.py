"""Sparse training path: the selected entries of ``[n, d_sae]`` codes as index lists.

A batch-level rule keeps about ``k`` of ``d_sae`` entries per token, so the dense
decode and its backward spend almost all their work on zeros. Here the selection is
carried as ``(row, col)`` pairs (rows sorted) and two autograd functions,
:func:`gather_linear` (the encoder's selected pre-activations) and
:func:`sparse_decode`, work in ``O(n_selected * d_in)`` with ``embedding_bag`` (sum
mode, per-sample weights), which never materialises an ``[n_selected, d_in]``
product. Pure torch; no SAELens imports.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def bag_offsets(sorted_keys: torch.Tensor, n_bags: int) -> torch.Tensor:
    """Start offset of each bag for ``embedding_bag`` given non-decreasing bag keys
    (a binary search: ``bincount`` syncs with the host on CUDA)."""
    bags = torch.arange(n_bags, device=sorted_keys.device, dtype=sorted_keys.dtype)
    return torch.searchsorted(sorted_keys, bags)


@dataclass
class SparseCodes:
    """Positions of the selected entries of an ``[n_rows, n_cols]`` code matrix,
    ``rows`` non-decreasing, with the column order and offsets both backward passes
    need."""

    rows: torch.Tensor
    cols: torch.Tensor
    n_rows: int
    n_cols: int
    row_offsets: torch.Tensor
    col_order: torch.Tensor
    col_offsets: torch.Tensor
    # ``rows`` in column-sorted order; both backward passes read it.
    rows_by_col: torch.Tensor
    # Fixed-size codes (from_dense_fixed): which entries are real; the others are
    # padding whose values must be 0. None: every entry is real.
    valid: torch.Tensor | None = None

    @classmethod
    def from_rows_cols(
        cls,
        rows: torch.Tensor,
        cols: torch.Tensor,
        n_rows: int,
        n_cols: int,
        valid: torch.Tensor | None = None,
        row_offsets: torch.Tensor | None = None,
    ) -> SparseCodes:
        """Codes of the entries ``(rows[e], cols[e])``, ``rows`` non-decreasing;
        ``row_offsets``: each row's first entry, when the caller knows them."""
        col_order = torch.argsort(cols, stable=True)
        if row_offsets is None:
            row_offsets = bag_offsets(rows, n_rows)
        return cls(
            rows=rows,
            cols=cols,
            n_rows=n_rows,
            n_cols=n_cols,
            row_offsets=row_offsets,
            col_order=col_order,
            col_offsets=bag_offsets(cols[col_order], n_cols),
            rows_by_col=rows[col_order],
            valid=valid,
        )

    @classmethod
    @torch.no_grad()
    def from_dense(cls, codes: torch.Tensor) -> SparseCodes:
        """The nonzero entries of a ``[n_rows, n_cols]`` matrix (a host sync on GPU)."""
        rows, cols = codes.nonzero().unbind(1)
        return cls.from_rows_cols(rows, cols, codes.shape[0], codes.shape[1])

    @classmethod
    @torch.no_grad()
    def from_dense_fixed(cls, codes: torch.Tensor, size: int) -> SparseCodes:
        """Exactly ``size`` entries of a matrix with at most ``size`` nonzero ones,
        with no host read: the nonzero entries in row-major order, then padding at
        ``(n_rows - 1, 0)`` (flagged in :attr:`valid`; its values must be 0).

        Each nonzero entry's slot is its row's start (a scan over the row counts)
        plus its rank within the row (a scan along the row).
        """
        n_rows, n_cols = codes.shape
        device = codes.device
        # 32-bit positions where they fit: these passes run over every entry.
        dtype = torch.int32 if n_rows * n_cols < 2**31 - 1 else torch.int64
        nonzero = codes != 0
        rank = nonzero.cumsum(dim=1, dtype=dtype)
        row_counts = rank[:, -1]
        row_starts = row_counts.cumsum(0, dtype=dtype) - row_counts
        slot = row_starts[:, None] + rank - 1
        # Entries past `size` (never, for a selection within its budget) and the
        # zero entries go to one extra slot that is dropped.
        slot = torch.where(nonzero & (slot < size), slot, size).long()
        positions = torch.arange(n_rows * n_cols, device=device, dtype=dtype)
        flat = torch.full(
            (size + 1,), (n_rows - 1) * n_cols, device=device, dtype=dtype
        )
        flat = flat.scatter_(0, slot.flatten(), positions.view(-1))[:size].long()
        valid = torch.arange(size, device=device) < row_counts.sum()
        return cls.from_rows_cols(
            flat // n_cols, flat % n_cols, n_rows, n_cols, valid=valid
        )

    @property
    def flat_indices(self) -> torch.Tensor:
        return self.rows * self.n_cols + self.cols


@torch.no_grad()
def column_stats(
    codes: SparseCodes, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column, in ``O(n_selected)``: ``(dense > 0).sum(0)`` (float64, the dtype
    of the EMAs it feeds) and the smallest positive entry (``inf`` where none)."""
    positive = values > 0
    # Masks rather than boolean indexing: no host sync on accelerators.
    counts = values.new_zeros(codes.n_cols, dtype=torch.float64)
    counts.index_add_(0, codes.cols, positive.to(torch.float64))
    smallest = values.new_full((codes.n_cols,), torch.inf)
    positives = torch.where(positive, values, torch.inf)
    smallest.scatter_reduce_(0, codes.cols, positives, "amin")
    return counts, smallest


def _bag_sum(
    codes: SparseCodes, table: torch.Tensor, weights: torch.Tensor, by_col: bool = False
) -> torch.Tensor:
    """``out[r] = sum over entries e of row r of weights[e] * table[cols[e]]``, or
    ``by_col``: ``out[c] = sum over entries e of column c of weights[e] *
    table[rows[e]]``."""
    indices, offsets = codes.cols, codes.row_offsets
    if by_col:
        indices, offsets = codes.rows_by_col, codes.col_offsets
        weights = weights[codes.col_order]
    return F.embedding_bag(
        indices, table, offsets, mode="sum", per_sample_weights=weights.to(table.dtype)
    )


def _entry_dots(
    codes: SparseCodes, row_vectors: torch.Tensor, col_vectors: torch.Tensor
) -> torch.Tensor:
    """``row_vectors[rows[e]] . col_vectors[cols[e]]`` for every entry ``e``."""
    try:
        # embedding_bag's own per-sample-weight gradient: the dots without gathering
        # an [n_selected, d] copy of either operand.
        dots: torch.Tensor = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            row_vectors, col_vectors, codes.cols, codes.row_offsets, codes.rows, 0, -1
        )
        return dots
    except (RuntimeError, AttributeError):  # pragma: no cover - private op changed
        chunk = 1 << 14
        return torch.cat(
            [
                (row_vectors[r] * col_vectors[c]).sum(-1)
                for r, c in zip(
                    codes.rows.split(chunk), codes.cols.split(chunk), strict=True
                )
            ]
        )


class _GatherLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        product: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        codes: SparseCodes,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.codes = codes
        ctx.bias_dtype = bias.dtype
        return product.detach()[codes.rows, codes.cols]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        codes: SparseCodes = ctx.codes
        grad_x = grad_weight = grad_bias = None
        with torch.autocast(x.device.type, enabled=False):
            if ctx.needs_input_grad[1]:
                # d/dx_r = sum_e g_e W[:, c_e]: rows of W^T summed per token.
                summed = _bag_sum(codes, weight.t().contiguous(), grad)
                grad_x = summed.to(x.dtype)
            if ctx.needs_input_grad[2]:
                # d/dW[:, c] = sum_e g_e x_{r_e}, built as [n_cols, d_in] then transposed.
                grad_weight = _bag_sum(codes, x.to(weight.dtype), grad, by_col=True).t()
            if ctx.needs_input_grad[3]:
                grad_bias = torch.zeros(
                    codes.n_cols, dtype=ctx.bias_dtype, device=grad.device
                ).index_add_(0, codes.cols, grad.to(ctx.bias_dtype))
        return None, grad_x, grad_weight, grad_bias, None


def gather_linear(
    product: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    codes: SparseCodes,
) -> torch.Tensor:
    """``product[rows, cols]`` of the computed ``product = x @ weight + bias`` (read,
    never differentiated), with gradients into ``x``, ``weight`` and ``bias``
    through the selected entries only."""
    out: torch.Tensor = _GatherLinear.apply(product, x, weight, bias, codes)  # type: ignore[no-untyped-call]
    return out


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, values: torch.Tensor, weight: torch.Tensor, codes: SparseCodes
    ) -> torch.Tensor:
        ctx.save_for_backward(values, weight)
        ctx.codes = codes
        with torch.autocast(weight.device.type, enabled=False):
            return _bag_sum(codes, weight, values)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        values, weight = ctx.saved_tensors
        codes: SparseCodes = ctx.codes
        grad = grad.to(weight.dtype).contiguous()
        grad_values = grad_weight = None
        with torch.autocast(weight.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                grad_values = _entry_dots(codes, grad, weight).to(values.dtype)
            if ctx.needs_input_grad[1]:
                grad_weight = _bag_sum(codes, grad, values, by_col=True)
        return grad_values, grad_weight, None


def sparse_decode(
    values: torch.Tensor, weight: torch.Tensor, codes: SparseCodes
) -> torch.Tensor:
    """``codes_dense @ weight`` (``weight`` ``[n_cols, d_out]``) from the selected
    entries' ``values``, with gradients into ``values`` and ``weight``."""
    out: torch.Tensor = _SparseDecode.apply(values, weight, codes)  # type: ignore[no-untyped-call]
    return out


class _Densify(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        values: torch.Tensor,  # noqa: ARG004  (differentiated, not read)
        holder: list[torch.Tensor],
        codes: SparseCodes,
    ) -> torch.Tensor:
        ctx.codes = codes
        # Handed over in a list so autograd sees a new output, not a view of an input
        # (a view would forbid later in-place edits such as ablations).
        return holder.pop()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        codes: SparseCodes = ctx.codes
        return grad.reshape(-1, codes.n_cols)[codes.rows, codes.cols], None, None


def attach_values(
    values: torch.Tensor, dense: torch.Tensor, codes: SparseCodes
) -> torch.Tensor:
    """``dense`` (holding ``values`` at the codes' entries, zeros elsewhere, built
    without grad; any shape that flattens to ``[n_rows, n_cols]``), made
    differentiable with respect to ``values`` at no cost unless something
    back-propagates through it. The result shares its memory.
    """
    out: torch.Tensor = _Densify.apply(values, [dense.detach()], codes)  # type: ignore[no-untyped-call]
    return out


@dataclass(frozen=True)
class DecoderNorms:
    """The decoder row norms ``||W_dec[cols[e]]||`` of the selected entries one
    training encode computed (detached), for decode to reuse while the decoder's
    in-place ``version`` counter is unchanged."""

    of_entries: torch.Tensor
    version: int

    @classmethod
    def of(
        cls, decoder: torch.Tensor, of_entries: torch.Tensor | None
    ) -> DecoderNorms | None:
        if of_entries is None:
            return None
        # Version counters are not traced (see SelectedEntries.describe).
        version = -1 if torch.compiler.is_compiling() else decoder._version
        return cls(of_entries, version)

    def current(self, decoder: torch.Tensor) -> bool:
        """Whether ``decoder`` is unchanged since these were taken (a compiled step
        does not trace version counters; nothing edits it between encode and decode
        there)."""
        return torch.compiler.is_compiling() or self.version == decoder._version


@dataclass(frozen=True)
class SelectedEntries:
    """The selected entries of the dense codes one training encode returned, which
    decode and the state update read instead of that very tensor while it is
    unmodified (a hook that returns another tensor, or an in-place edit, leaves
    the dense codes as the only truth): their ``codes`` and differentiable
    ``values``, a weak reference to the ``dense`` tensor and its in-place
    ``version`` counter then, and the decoder ``norms`` the encode scaled by (None:
    no rescaling).
    """

    codes: SparseCodes
    values: torch.Tensor
    dense: weakref.ref[torch.Tensor]
    version: int
    norms: DecoderNorms | None = None

    @classmethod
    def of(
        cls,
        dense: torch.Tensor,
        codes: SparseCodes,
        values: torch.Tensor,
        norms: DecoderNorms | None = None,
    ) -> SelectedEntries:
        return cls(codes, values, weakref.ref(dense), dense._version, norms)

    def norms_of_entries(self, decoder: torch.Tensor) -> torch.Tensor:
        """``||decoder[cols]||`` per entry: the encode's, unless ``decoder`` has
        changed in place since (then computed afresh)."""
        norms = self.norms
        if norms is not None and norms.current(decoder):
            return norms.of_entries
        fresh: torch.Tensor = decoder.norm(dim=-1)[self.codes.cols]
        return fresh

    def describe(self, dense: torch.Tensor) -> bool:
        """Whether these are the entries of ``dense`` as it is now."""
        if torch.compiler.is_compiling():
            # Version counters are not traced; the edits they catch come from hooks,
            # which send the training encode down the dense path anyway.
            return self.dense() is dense
        return self.dense() is dense and dense._version == self.version

    # A copy of the module holding these gets none: they belong to a tensor of the
    # original's autograd graph, which cannot be deep-copied.
    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None
