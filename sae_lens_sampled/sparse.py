"""Sparse training path: the selected entries of ``[n, d_sae]`` codes as index lists.

A batch-level rule keeps about ``k`` of ``d_sae`` entries per token, so decoding the
dense code matrix, and back-propagating through it, spends almost all of its work on
zeros. Here the selection is carried as ``(row, col)`` pairs (rows sorted) and two
autograd functions do the rest in ``O(n_selected * d_in)``:

- :func:`gather_linear` reads the selected pre-activations ``x @ W + b`` out of an
  already computed dense product and back-propagates into ``x``, ``W`` and ``b``
  through the selected entries only (the dense ``[n, d_sae]`` gradient is never formed);
- :func:`sparse_decode` computes ``sum_e values[e] * W_dec[cols[e]]`` per row and its
  gradients for ``values`` and ``W_dec``.

Both use ``embedding_bag`` (sum mode with per-sample weights), which accumulates
gathered rows without materialising the ``[n_selected, d_in]`` product. Pure torch; no
SAELens imports.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def bag_offsets(sorted_keys: torch.Tensor, n_bags: int) -> torch.Tensor:
    """Start offset of each bag for ``embedding_bag`` given non-decreasing bag keys.

    A binary search rather than ``bincount``, which syncs with the host on CUDA (its
    output size depends on the data).
    """
    bags = torch.arange(n_bags, device=sorted_keys.device, dtype=sorted_keys.dtype)
    return torch.searchsorted(sorted_keys, bags)


@dataclass
class SparseCodes:
    """Positions of the selected entries of an ``[n_rows, n_cols]`` code matrix.

    ``rows`` must be non-decreasing (row-major order, as ``nonzero`` returns). The
    column-sorted order and both offset vectors are precomputed once because the
    encoder and decoder backward passes both need them.
    """

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
        """Exactly ``size`` entries of a ``[n_rows, n_cols]`` matrix with at most
        ``size`` nonzero entries, with no host read: the nonzero entries in row-major
        order, then padding at ``(n_rows - 1, 0)`` (flagged in :attr:`valid`; its
        values must be 0) up to ``size``. Rows stay non-decreasing.

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
    """Per column: how many entries are positive, and the smallest positive one.

    The same numbers as ``(dense > 0).sum(0)`` (as float64, the dtype of the EMAs the
    counts feed, exact for any batch) and the column minimum over the positive
    entries of the dense codes (``inf`` where there are none), in ``O(n_selected)``.
    """
    positive = values > 0
    # Masks rather than boolean indexing: no host sync on accelerators.
    counts = values.new_zeros(codes.n_cols, dtype=torch.float64)
    counts.index_add_(0, codes.cols, positive.to(torch.float64))
    smallest = values.new_full((codes.n_cols,), torch.inf)
    positives = torch.where(positive, values, torch.inf)
    smallest.scatter_reduce_(0, codes.cols, positives, "amin")
    return counts, smallest


def _sum_by_row(
    codes: SparseCodes, table: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``out[r] = sum over entries e of row r of weights[e] * table[cols[e]]``."""
    return F.embedding_bag(
        codes.cols,
        table,
        codes.row_offsets,
        mode="sum",
        per_sample_weights=weights.to(table.dtype),
    )


def _sum_by_col(
    codes: SparseCodes, table: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``out[c] = sum over entries e of column c of weights[e] * table[rows[e]]``."""
    order = codes.col_order
    return F.embedding_bag(
        codes.rows_by_col,
        table,
        codes.col_offsets,
        mode="sum",
        per_sample_weights=weights[order].to(table.dtype),
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
                grad_x = _sum_by_row(codes, weight.t().contiguous(), grad).to(x.dtype)
            if ctx.needs_input_grad[2]:
                # d/dW[:, c] = sum_e g_e x_{r_e}, built as [n_cols, d_in] then transposed.
                grad_weight = _sum_by_col(codes, x.to(weight.dtype), grad).t()
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
    """Selected entries of ``x @ weight + bias``, with a sparse backward.

    ``product`` must hold ``x @ weight + bias`` (``[n, d_sae]``; it is read, never
    differentiated). Returns ``product[rows, cols]`` whose gradient flows into ``x``
    ``[n, d_in]``, ``weight`` ``[d_in, d_sae]`` and ``bias`` ``[d_sae]`` in
    ``O(n_selected * d_in)``.
    """
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
            return _sum_by_row(codes, weight, values)

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
                grad_weight = _sum_by_col(codes, grad, values)
        return grad_values, grad_weight, None


def sparse_decode(
    values: torch.Tensor, weight: torch.Tensor, codes: SparseCodes
) -> torch.Tensor:
    """``codes_dense @ weight`` from the selected entries: ``[n_rows, d_out]``.

    ``values[e]`` is the code at ``(codes.rows[e], codes.cols[e])``; ``weight`` is
    ``[n_cols, d_out]``. Gradients flow into ``values`` and ``weight``.
    """
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
    """``dense`` (already holding ``values`` at the codes' entries, zeros elsewhere;
    any leading shape that flattens to ``[n_rows, n_cols]``), made differentiable with
    respect to ``values``.

    Building the dense codes without grad and attaching the gradient this way costs
    nothing unless something back-propagates through the dense tensor. ``dense`` must
    not require grad; the result shares its memory.
    """
    out: torch.Tensor = _Densify.apply(values, [dense.detach()], codes)  # type: ignore[no-untyped-call]
    return out


@dataclass(frozen=True)
class DecoderNorms:
    """The decoder row norms of the selected entries one training encode computed
    (detached: the sparse path's loss does not depend on them), for decode to reuse
    while the decoder is unchanged.

    Args:
        of_entries (torch.Tensor): ``||W_dec[cols[e]]||`` per selected entry.
        version (int): The decoder's in-place version counter when they were taken.
    """

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
        """Whether ``decoder`` is unchanged since these were taken. In a compiled
        step nothing edits the decoder between encode and decode, and version
        counters are not traced."""
        return torch.compiler.is_compiling() or self.version == decoder._version


@dataclass(frozen=True)
class SelectedEntries:
    """The selected entries of the dense codes one training encode returned.

    Decoding and the state update read these (``O(n_selected)``) instead of the dense
    codes, but only for that very tensor, unmodified: a hook that returns another
    tensor, or an in-place edit, leaves the dense codes as the only truth.

    Args:
        codes (SparseCodes): Positions of the selected entries.
        values (torch.Tensor): Their values (differentiable), ``[n_selected]``.
        dense (weakref.ref): The dense codes tensor they belong to (weak, so these
            never keep it alive).
        version (int): That tensor's in-place version counter when it was returned.
        norms (DecoderNorms | None): The decoder norms the encode scaled by (None:
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
