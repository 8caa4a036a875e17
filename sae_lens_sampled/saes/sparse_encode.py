"""The training SAEs' sparse encode and sparse aux-k reconstruction, as tensor code.

The training encode selects without grad and gathers only the selected values (with
their gradient) out of the dense pre-activations, so neither the loss nor its
backward touches the ``[n, d_sae]`` code matrix; the aux-k loss does the same with its
picks. Pure torch; no SAELens imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sae_lens_sampled.global_batch import PositionsBatch
from sae_lens_sampled.sparse import SparseCodes, gather_linear, sparse_decode


@dataclass(frozen=True)
class SparseEncode:
    """The dense pieces of a sparse training encode that a sparse aux loss reads.

    Args:
        hidden_pre (torch.Tensor): The ``hidden_pre`` the encode returned.
        pre (torch.Tensor): ``sae_in @ W_enc + b_enc``, ``[n, d_sae]``.
        sae_in (torch.Tensor): The processed input, ``[n, d_in]``.
    """

    hidden_pre: torch.Tensor
    pre: torch.Tensor
    sae_in: torch.Tensor

    # A copy of the module holding this gets none (tensors of an autograd graph).
    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None


def encoder_pre(
    sae_in: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor
) -> torch.Tensor:
    """``sae_in @ W_enc + b_enc``, with the bias added in place where that is exact."""
    pre = sae_in @ W_enc
    if pre.dtype == torch.promote_types(pre.dtype, b_enc.dtype):
        # In place: same values as `sae_in @ W_enc + b_enc`, one [n, d_sae] fewer.
        return pre.add_(b_enc)
    # Under autocast the product is bf16/fp16; the dense path (and SAELens's
    # BatchTopK) add the float32 b_enc out of place, in float32.
    return pre + b_enc


def selected_values(
    pre: torch.Tensor,
    sae_in: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    codes: SparseCodes,
    norms: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The values of the selected entries (``[n, d_sae]`` ``pre`` and ``[n, d_in]``
    ``sae_in``), ``relu(pre * norms)``, with their gradient through
    :func:`gather_linear`; and the decoder norms of the entries (None: no rescaling).
    """
    values = gather_linear(pre, sae_in, W_enc, b_enc, codes)
    entry_norms = None
    if norms is not None:
        # The codes relu(pre * n) are decoded as codes * (1 / n): the loss does
        # not depend on n (its gradient there is 0 up to rounding), so the
        # entries read the norms detached and skip that backward. hidden_pre
        # keeps its gradient through them (a dense aux loss reads it).
        entry_norms = norms.detach()[codes.cols]
        values = values * entry_norms
    values = values.relu()
    if codes.valid is not None:  # padding entries hold 0, and get no gradient
        values = torch.where(codes.valid, values, values.new_zeros(()))
    return values, entry_norms


def positions_codes(
    selected: torch.Tensor, batch: PositionsBatch, columns: torch.Tensor | None
) -> SparseCodes:
    """The codes of ``selected`` (``[n_tokens, d_sae]``, what a rule kept on
    ``batch``): from the positions its batch top-k found where it ran one over every
    feature or over ``columns`` (ascending; exactly the budget, no scan of the dense
    result), else from ``selected`` itself, padded to ``batch.size`` entries."""
    n_tokens, d_sae = selected.shape
    positions, width = batch.positions, batch.width
    if positions is None or not (
        width == d_sae or (columns is not None and columns.numel() == width)
    ):
        return SparseCodes.from_dense_fixed(selected, batch.size)
    rows, cols = positions // width, positions % width
    if columns is not None:  # ascending, so rows stay in order
        cols = columns[cols]
    return SparseCodes.from_rows_cols(rows, cols, n_tokens, d_sae, valid=batch.kept)


def sparse_aux_recons(
    encode: SparseEncode,
    mask: torch.Tensor,
    k_aux: int,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
) -> torch.Tensor:
    """The aux-k reconstruction from the ``k_aux`` picks per token among ``mask``:
    their values gathered as in the sparse encode and decoded with
    :func:`sparse_decode` (``O(n * k_aux * d_in)``, no ``[n, d_sae]`` matrix)."""
    pre, sae_in = encode.pre, encode.sae_in
    n_tokens, d_sae = pre.shape
    with torch.no_grad():
        mask = mask.to(device=pre.device, dtype=torch.bool)
        flat = encode.hidden_pre.detach().flatten(end_dim=-2)
        candidates = torch.where(mask, flat, -torch.inf)
        cols = candidates.topk(k_aux, dim=-1, sorted=False).indices.flatten()
        # k_aux entries per row: row r's start at r * k_aux
        rows = torch.arange(n_tokens * k_aux, device=pre.device) // k_aux
        row_offsets = torch.arange(0, n_tokens * k_aux, k_aux, device=pre.device)
        picked = mask[cols]
    codes = SparseCodes.from_rows_cols(
        rows, cols, n_tokens, d_sae, row_offsets=row_offsets
    )
    # With rescaling, hidden_pre = pre * ||W_dec|| is decoded as
    # hidden_pre / ||W_dec||: the norms cancel (their gradient is 0), so the
    # picks decode their `pre` values directly.
    values = gather_linear(pre, sae_in, W_enc, b_enc, codes)
    values = values * picked  # picks outside the mask count 0
    recons = sparse_decode(values, W_dec, codes)
    return recons.reshape(*encode.hidden_pre.shape[:-1], W_dec.shape[1])
