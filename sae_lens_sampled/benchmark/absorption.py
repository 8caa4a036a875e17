"""Ground-truth feature absorption on synthetic data with a feature hierarchy.

An SAE absorbs a parent feature into a child when, on tokens where both are active,
the parent's latent stays silent and a child latent reconstructs the parent's
direction instead. ``docs/absorption.md`` defines every step;
:func:`absorption_metrics` is the entry point. Nothing here imports SAELens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from sae_lens_sampled.checks import check_range

if TYPE_CHECKING:
    from sae_lens.training.activation_scaler import ActivationScaler


# ---------------------------------------------------------------------------
# Hierarchy


@dataclass(frozen=True)
class HierarchyParent:
    """A ground-truth feature with descendants; ``depth`` counts feature-bearing
    ancestors (0 for a root). Nodes without a feature index are looked through, as
    SAELens's modifier does, so ``children`` are the nearest features below."""

    feature: int
    depth: int
    children: tuple[int, ...]
    descendants: tuple[int, ...]


def _feature_frontier(node: Any) -> list[Any]:
    """The nearest feature-bearing nodes at or below ``node``."""
    if node.feature_index is not None:
        return [node]
    return [hit for child in node.children for hit in _feature_frontier(child)]


def _subtree_features(node: Any) -> list[int]:
    own = [] if node.feature_index is None else [node.feature_index]
    return own + [i for child in node.children for i in _subtree_features(child)]


def hierarchy_parents(hierarchy: Any) -> list[HierarchyParent]:
    """Every feature with descendants, breadth-first, in a SAELens
    ``SyntheticModel`` (its ``.hierarchy``), a ``Hierarchy`` (``.roots``), a list of
    root ``HierarchyNode``s, or None (no hierarchy: an empty list)."""
    if hasattr(hierarchy, "hierarchy"):
        hierarchy = hierarchy.hierarchy
    if hierarchy is None:
        return []
    roots = list(getattr(hierarchy, "roots", hierarchy))
    parents: list[HierarchyParent] = []
    queue = [(node, 0) for root in roots for node in _feature_frontier(root)]
    while queue:
        node, depth = queue.pop(0)
        children = [hit for c in node.children for hit in _feature_frontier(c)]
        if children:
            parents.append(
                HierarchyParent(
                    feature=node.feature_index,
                    depth=depth,
                    children=tuple(c.feature_index for c in children),
                    descendants=tuple(
                        i for c in node.children for i in _subtree_features(c)
                    ),
                )
            )
        queue.extend((child, depth + 1) for child in children)
    return parents


# ---------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class AbsorptionThresholds:
    """The cut-offs of the metric (``docs/absorption.md`` says why each value)."""

    # Least decoder cosine with the parent for a latent to stand for it.
    parent_cos: float = 0.5
    # How much closer to the parent than to any descendant: keeps out a fully
    # absorbing child latent (cosine ~0.71 with both).
    parent_margin: float = 0.1
    # A latent inside the margin joins the parent set unless its firing rate on
    # parent tokens without its closest descendant is below this times its rate
    # with it (merged "family" latents join; child-specific ones stay out).
    child_specificity: float = 0.4
    # Least decoder cosine of an absorbing latent with the parent (SAEBench's).
    absorber_cos: float = 0.1
    # Least share of the parent's true contribution an absorber must reconstruct.
    absorber_share: float = 0.4
    # Parents with fewer eligible tokens are flagged ``thin`` (they still count).
    min_tokens: int = 50

    def __post_init__(self) -> None:
        check_range("parent_cos", self.parent_cos, low=0, high=1, low_inclusive=False)
        check_range("parent_margin", self.parent_margin, low=0, high=2)
        check_range("child_specificity", self.child_specificity, low=0, high=1)
        check_range("absorber_cos", self.absorber_cos, low=0, high=1)
        check_range(
            "absorber_share", self.absorber_share, low=0, high=1, low_inclusive=False
        )
        check_range("min_tokens", self.min_tokens, low=0)


# ---------------------------------------------------------------------------
# Results


@dataclass
class ParentAbsorption:
    """One parent's row of the result table (``docs/absorption.md``, steps 1-7).

    ``parent_latents`` is the parent latent set M_p; ``child_latents`` the best
    latent outside it per descendant; eligible tokens have the parent and a
    descendant active, parent-only tokens no descendant; the rates are the counts
    over eligible (or parent-only) tokens, None without any; ``best_f1_latent`` is
    the latent whose firing best predicts the parent's over every token.
    """

    feature: int
    depth: int
    children: list[int]
    parent_latents: list[int]
    child_latents: dict[int, int | None]
    eligible_tokens: int
    absorbed_tokens: int
    uncompensated_tokens: int
    fraction_sum: float
    parent_only_tokens: int
    parent_only_misses: int
    best_f1_latent: int
    best_f1: float
    absorption: float | None
    absorption_fraction: float | None
    uncompensated_rate: float | None
    parent_only_miss_rate: float | None
    no_parent_latent: bool
    parent_latent_silent: bool
    thin: bool

    @property
    def best_f1_in_parent_set(self) -> bool:
        return self.best_f1_latent in self.parent_latents


@dataclass
class AbsorptionResult:
    """Absorption of one SAE on one sample (``docs/absorption.md``, steps 5-7):
    ``absorption`` is absorbed / eligible tokens pooled over all parents (None when
    no token was eligible); the other rates are pooled the same way."""

    absorption: float | None
    absorption_parent_mean: float | None
    absorption_fraction: float | None
    uncompensated_miss_rate: float | None
    parent_only_miss_rate: float | None
    mean_parent_latents: float
    parents_without_latent: int
    best_f1_agreement: float
    absorption_by_depth: dict[int, float | None]
    eligible_tokens: int
    tokens: int
    per_parent: list[ParentAbsorption] = field(default_factory=list)
    thresholds: AbsorptionThresholds = field(default_factory=AbsorptionThresholds)

    def summary(self) -> dict[str, Any]:
        """The scalar fields (for a results row)."""
        return {
            "absorption": self.absorption,
            "absorption_parent_mean": self.absorption_parent_mean,
            "absorption_fraction": self.absorption_fraction,
            "absorption_uncompensated": self.uncompensated_miss_rate,
            "absorption_parent_only_miss": self.parent_only_miss_rate,
            "absorption_parent_latents": self.mean_parent_latents,
            "absorption_parents_without_latent": self.parents_without_latent,
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (depth keys become strings)."""
        payload = asdict(self)
        payload["absorption_by_depth"] = {
            str(depth): value for depth, value in self.absorption_by_depth.items()
        }
        for row, parent in zip(payload["per_parent"], self.per_parent, strict=True):
            row["child_latents"] = {str(c): j for c, j in parent.child_latents.items()}
            row["best_f1_in_parent_set"] = parent.best_f1_in_parent_set
        return payload


# ---------------------------------------------------------------------------
# Latent assignment


def unit_rows(matrix: torch.Tensor) -> torch.Tensor:
    norms: torch.Tensor = matrix.norm(dim=-1, keepdim=True)
    return matrix / norms.clamp(min=1e-12)


@dataclass
class ParentCandidates:
    """``[m]`` latents with cosine >= ``parent_cos`` to a parent: whether each is
    ``clear`` (``parent_margin`` closer to the parent than to any descendant: a
    parent latent outright) and the position in ``descendants`` of its
    ``closest`` descendant (the child it would be absorbing)."""

    latents: torch.Tensor
    clear: torch.Tensor
    closest: torch.Tensor


def parent_candidates(
    cos: torch.Tensor, parent: HierarchyParent, thresholds: AbsorptionThresholds
) -> ParentCandidates:
    """Candidates for the parent latent set, from ``[d_sae, F]`` decoder cosines."""
    to_parent = cos[:, parent.feature]
    latents = (to_parent >= thresholds.parent_cos).nonzero().flatten()
    to_descendants = cos[latents][:, list(parent.descendants)]
    nearest = to_descendants.max(dim=1)
    clear = to_parent[latents] - nearest.values >= thresholds.parent_margin
    return ParentCandidates(latents, clear, nearest.indices)


def child_specific(
    fires: torch.Tensor,
    parent_active: torch.Tensor,
    child_active: torch.Tensor,
    specificity: float,
) -> torch.Tensor:
    """Whether each of ``m`` candidates (``fires`` ``[n, m]``) is child-specific:
    its firing rate on parent tokens without its closest descendant
    (``child_active`` ``[n, m]``) is below ``specificity`` times its rate on parent
    tokens with it. With no parent token lacking the child, the two cannot be told
    apart and the latent counts as child-specific."""
    with_child = parent_active[:, None] & child_active
    without_child = parent_active[:, None] & ~child_active
    n_with = with_child.sum(dim=0).clamp(min=1)
    n_without = without_child.sum(dim=0)
    rate_with = (fires & with_child).sum(dim=0) / n_with
    rate_without = (fires & without_child).sum(dim=0) / n_without.clamp(min=1)
    return (n_without == 0) | (rate_without < specificity * rate_with)


def child_latents(
    cos: torch.Tensor, parent: HierarchyParent, parent_set: torch.Tensor
) -> torch.Tensor:
    """Per descendant, the latent outside the parent set closest to it (-1: none)."""
    candidates = cos[:, list(parent.descendants)].clone()
    candidates[parent_set] = -math.inf
    best = candidates.max(dim=0)
    return torch.where(best.values > -math.inf, best.indices, -1)


def absorbed_fraction(
    parent_magnitude: torch.Tensor,
    parent_projection: torch.Tensor,
    absorber_projection: torch.Tensor,
    share: float,
) -> torch.Tensor:
    """SAEBench's absorption-fraction rule with the true parent magnitude as P.

    ``0`` when the parent latents already reconstruct the parent (M >= P) or the
    absorbers carry less than ``share`` of it; ``1`` when the parent latents give
    nothing (M <= 0); otherwise the absorbers' share a / (a + M), a = min(A, P - M).
    """
    p, m, a_total = parent_magnitude, parent_projection, absorber_projection
    absorbed = torch.minimum(a_total, p - m)
    partial = absorbed / (absorbed + m).clamp(min=1e-12)
    fraction = torch.where(m <= 0, torch.ones_like(p), partial)
    fraction = torch.where((m >= p) | (a_total < share * p), 0.0, fraction)
    return fraction.clamp(0.0, 1.0)


# ---------------------------------------------------------------------------
# Token counts


class AbsorptionCounter:
    """Collects batches of codes (:meth:`add`) and scores them (:meth:`result`).

    Only the codes of latents that can enter a parent set or be a descendant's
    best latent are kept (plus firing counts of every latent for the best-F1
    cross-check), so memory grows with tokens x those latents, not x ``d_sae``.
    ``W_dec`` ``[d_sae, d_in]`` is in the units of ``feature_vectors``
    ``[num_features, d_in]``; any norms (a feature's true contribution along its
    direction is ``activation * norm``).
    """

    def __init__(
        self,
        W_dec: torch.Tensor,
        feature_vectors: torch.Tensor,
        parents: Sequence[HierarchyParent],
        thresholds: AbsorptionThresholds | None = None,
    ):
        if W_dec.ndim != 2 or feature_vectors.ndim != 2:
            raise ValueError(
                f"W_dec and feature_vectors must be 2-d, got shapes "
                f"{tuple(W_dec.shape)} and {tuple(feature_vectors.shape)}"
            )
        if W_dec.shape[1] != feature_vectors.shape[1]:
            raise ValueError(
                f"W_dec rows (width {W_dec.shape[1]}) and feature_vectors (width "
                f"{feature_vectors.shape[1]}) must live in the same space"
            )
        if not parents:
            raise ValueError("parents is empty: absorption needs a feature hierarchy")
        num_features = feature_vectors.shape[0]
        for parent in parents:
            for index in (parent.feature, *parent.descendants):
                check_range("feature index", index, low=0, high=num_features - 1)
        self.thresholds = thresholds or AbsorptionThresholds()
        self.parents = list(parents)
        device = W_dec.device
        W_dec = W_dec.detach().float()
        vectors = feature_vectors.detach().float().to(device)
        self.feature_norms = vectors.norm(dim=1)
        directions = unit_rows(vectors)
        # cos[j, i] = <w_j / |w_j|, d_i>; projection[j, i] = <w_j, d_i>, the
        # reconstruction one unit of latent j adds along feature i's direction.
        self.cos = unit_rows(W_dec) @ directions.T
        self.projection = W_dec @ directions.T
        self.d_sae = W_dec.shape[0]
        self.num_features = num_features
        self.candidates = [
            parent_candidates(self.cos, parent, self.thresholds)
            for parent in self.parents
        ]
        # Latents worth keeping codes for: parent candidates, and per descendant
        # enough of its closest latents to skip every candidate.
        kept: set[int] = set()
        for parent, found in zip(self.parents, self.candidates, strict=True):
            kept.update(found.latents.tolist())
            depth = min(len(found.latents) + 1, self.d_sae)
            for child in parent.descendants:
                kept.update(self.cos[:, child].topk(depth).indices.tolist())
        self.kept_latents = torch.tensor(sorted(kept), dtype=torch.long, device=device)
        self.kept_features = torch.tensor(
            sorted({f for p in self.parents for f in (p.feature, *p.descendants)}),
            dtype=torch.long,
            device=device,
        )
        self._latent_column = _column_of(self.kept_latents, self.d_sae)
        self._feature_column = _column_of(self.kept_features, num_features)
        self._codes: list[torch.Tensor] = []
        self._acts: list[torch.Tensor] = []
        self.tokens = 0
        # Parent-detector counts for the best-F1 cross-check.
        self._parent_features = torch.tensor(
            [p.feature for p in self.parents], device=device
        )
        self._true_pos = torch.zeros(len(self.parents), self.d_sae, device=device)
        self._fires = torch.zeros(self.d_sae, device=device)
        self._parent_active = torch.zeros(len(self.parents), device=device)

    @torch.no_grad()
    def add(self, codes: torch.Tensor, feature_acts: torch.Tensor) -> None:
        """Keep one batch: ``codes`` [n, d_sae] and true ``feature_acts`` [n, F]."""
        if feature_acts.is_sparse:
            feature_acts = feature_acts.to_dense()
        if codes.shape != (feature_acts.shape[0], self.d_sae):
            raise ValueError(
                f"codes must have shape ({feature_acts.shape[0]}, {self.d_sae}), "
                f"got {tuple(codes.shape)}"
            )
        if feature_acts.shape[1] != self.num_features:
            raise ValueError(
                f"feature_acts must have {self.num_features} columns, got "
                f"{feature_acts.shape[1]}"
            )
        codes = codes.detach().float().to(self.cos.device)
        acts = feature_acts.detach().float().to(self.cos.device)
        fires = (codes != 0).float()
        active_parents = (acts[:, self._parent_features] > 0).float()
        self._true_pos += active_parents.T @ fires
        self._fires += fires.sum(dim=0)
        self._parent_active += active_parents.sum(dim=0)
        self._codes.append(codes[:, self.kept_latents])
        self._acts.append(acts[:, self.kept_features])
        self.tokens += codes.shape[0]

    @torch.no_grad()
    def result(self) -> AbsorptionResult:
        """The scores of every batch added so far."""
        if not self.tokens:
            raise ValueError("no codes were added; call add() first")
        codes = torch.cat(self._codes)
        acts = torch.cat(self._acts)
        rows = [
            self._score_parent(index, codes, acts) for index in range(len(self.parents))
        ]
        eligible = sum(r.eligible_tokens for r in rows)
        parent_only = sum(r.parent_only_tokens for r in rows)
        scored = [r.absorption for r in rows if r.absorption is not None]
        by_depth: dict[int, float | None] = {}
        for depth in sorted({r.depth for r in rows}):
            at_depth = [r for r in rows if r.depth == depth]
            by_depth[depth] = _ratio(
                sum(r.absorbed_tokens for r in at_depth),
                sum(r.eligible_tokens for r in at_depth),
            )
        return AbsorptionResult(
            absorption=_ratio(sum(r.absorbed_tokens for r in rows), eligible),
            absorption_parent_mean=sum(scored) / len(scored) if scored else None,
            absorption_fraction=_ratio(sum(r.fraction_sum for r in rows), eligible),
            uncompensated_miss_rate=_ratio(
                sum(r.uncompensated_tokens for r in rows), eligible
            ),
            parent_only_miss_rate=_ratio(
                sum(r.parent_only_misses for r in rows), parent_only
            ),
            mean_parent_latents=sum(len(r.parent_latents) for r in rows) / len(rows),
            parents_without_latent=sum(r.no_parent_latent for r in rows),
            best_f1_agreement=sum(r.best_f1_in_parent_set for r in rows) / len(rows),
            absorption_by_depth=by_depth,
            eligible_tokens=eligible,
            tokens=self.tokens,
            per_parent=rows,
            thresholds=self.thresholds,
        )

    def parent_set(
        self, index: int, fires: torch.Tensor, acts: torch.Tensor
    ) -> torch.Tensor:
        """The parent latent set of parent ``index`` (``fires``, ``acts``: stored
        columns): clear candidates, and ambiguous ones whose firing is not specific
        to the child they lean towards (merged "family" latents)."""
        parent, found = self.parents[index], self.candidates[index]
        descendants = torch.tensor(parent.descendants, device=acts.device)
        specific = child_specific(
            fires[:, self._latent_column[found.latents]],
            acts[:, self._feature_column[parent.feature]] > 0,
            acts[:, self._feature_column[descendants[found.closest]]] > 0,
            self.thresholds.child_specificity,
        )
        return found.latents[found.clear | ~specific]

    def _score_parent(
        self, index: int, codes: torch.Tensor, acts: torch.Tensor
    ) -> ParentAbsorption:
        """One parent's row from the stored ``codes`` and ``acts`` columns."""
        parent = self.parents[index]
        feature = parent.feature
        fires = codes != 0
        members = self.parent_set(index, fires, acts)
        # Best latent per descendant among the kept ones (which hold it: every
        # candidate plus one more of each descendant's closest latents).
        cos = torch.full_like(self.cos, -math.inf)
        cos[self.kept_latents] = self.cos[self.kept_latents]
        child_best = child_latents(cos, parent, members)
        absorber_ok = (child_best >= 0) & (
            self.cos[child_best.clamp(min=0), feature] >= self.thresholds.absorber_cos
        )
        columns = self._latent_column

        parent_acts = acts[:, self._feature_column[feature]]
        magnitude = parent_acts * self.feature_norms[feature]
        parent_active = parent_acts > 0
        descendants = torch.tensor(parent.descendants, device=acts.device)
        descendant_active = acts[:, self._feature_column[descendants]] > 0
        any_descendant = descendant_active.any(dim=1)
        eligible = parent_active & any_descendant
        parent_only = parent_active & ~any_descendant
        parent_fires = fires[:, columns[members]].any(dim=1)
        parent_projection = (
            codes[:, columns[members]] * self.projection[members, feature]
        ).sum(dim=1)

        latents = child_best.clamp(min=0)
        contribution = codes[:, columns[latents]] * self.projection[latents, feature]
        can_absorb = descendant_active & absorber_ok
        absorbs = (
            can_absorb
            & fires[:, columns[latents]]
            & (contribution >= self.thresholds.absorber_share * magnitude[:, None])
        ).any(dim=1)
        missed = eligible & ~parent_fires

        # Partial fraction: absorbers summed once per latent (two active children
        # may share their best latent).
        unique, inverse = torch.unique(latents, return_inverse=True)
        latent_active = torch.zeros(codes.shape[0], len(unique), device=codes.device)
        latent_active.index_add_(1, inverse, can_absorb.float())
        unique_contribution = (
            codes[:, columns[unique]] * self.projection[unique, feature]
        )
        absorber_projection = (
            unique_contribution.clamp(min=0) * (latent_active > 0)
        ).sum(dim=1)
        fraction = absorbed_fraction(
            magnitude,
            parent_projection,
            absorber_projection,
            self.thresholds.absorber_share,
        )

        true_pos = self._true_pos[index]
        false_pos = self._fires - true_pos
        false_neg = self._parent_active[index] - true_pos
        f1 = 2 * true_pos / (2 * true_pos + false_pos + false_neg).clamp(min=1)
        best = int(f1.argmax())
        n_eligible = int(eligible.sum())
        absorbed = int((missed & absorbs).sum())
        uncompensated = int((missed & ~absorbs).sum())
        fraction_sum = float(fraction[eligible].sum())
        n_parent_only = int(parent_only.sum())
        parent_only_misses = int((parent_only & ~parent_fires).sum())
        return ParentAbsorption(
            feature=feature,
            depth=parent.depth,
            children=list(parent.children),
            parent_latents=members.tolist(),
            child_latents={
                c: (j if j >= 0 else None)
                for c, j in zip(parent.descendants, child_best.tolist(), strict=True)
            },
            eligible_tokens=n_eligible,
            absorbed_tokens=absorbed,
            uncompensated_tokens=uncompensated,
            fraction_sum=fraction_sum,
            parent_only_tokens=n_parent_only,
            parent_only_misses=parent_only_misses,
            best_f1_latent=best,
            best_f1=float(f1[best]),
            absorption=_ratio(absorbed, n_eligible),
            absorption_fraction=_ratio(fraction_sum, n_eligible),
            uncompensated_rate=_ratio(uncompensated, n_eligible),
            parent_only_miss_rate=_ratio(parent_only_misses, n_parent_only),
            no_parent_latent=len(members) == 0,
            parent_latent_silent=len(members) > 0 and not bool(parent_fires.any()),
            thin=n_eligible < self.thresholds.min_tokens,
        )


def _column_of(kept: torch.Tensor, size: int) -> torch.Tensor:
    """Column of each of ``size`` indices in the stored tensors (-1: not kept)."""
    column = torch.full((size,), -1, device=kept.device)
    column[kept] = torch.arange(len(kept), device=kept.device)
    return column


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


# ---------------------------------------------------------------------------
# Entry point


def decoder_in_input_units(
    W_dec: torch.Tensor, activation_scaler: ActivationScaler | None
) -> torch.Tensor:
    """Decoder rows mapped back through the linear part of the activation scaler.

    An SAE trained on scaled inputs (SAELens ``ActivationScaler``: a norm factor
    and/or whitening) reconstructs ``unscale(z @ W_dec)``; the ground-truth vectors
    live in unscaled units, so each row goes through ``unscale`` minus its offset.
    """
    if activation_scaler is None:
        return W_dec
    zero = torch.zeros(1, W_dec.shape[1], dtype=W_dec.dtype, device=W_dec.device)
    return activation_scaler.unscale(W_dec) - activation_scaler.unscale(zero)


@torch.no_grad()
def absorption_metrics(
    encode: Callable[[torch.Tensor], torch.Tensor],
    W_dec: torch.Tensor,
    synthetic_model: Any,
    feature_acts: torch.Tensor,
    hidden: torch.Tensor | None = None,
    *,
    batch_size: int | None = None,
    activation_scaler: ActivationScaler | None = None,
    thresholds: AbsorptionThresholds | None = None,
) -> AbsorptionResult:
    """Ground-truth absorption of an SAE on samples of a SAELens ``SyntheticModel``
    with a hierarchy (``docs/absorption.md``, "Using it").

    ``encode`` is ``sae.encode`` or a batch rule with ``batch_size`` (rows per call;
    None: all at once) set to the batch size it expects. ``feature_acts`` are the
    true activations of one draw (dense or sparse COO); ``hidden`` the matching
    inputs (None: ``synthetic_model.feature_dict(feature_acts)``). With an
    ``activation_scaler`` (the SAE was trained behind it, norm factor not folded
    in) inputs are scaled before ``encode``, as SAELens's synthetic evals do, and
    the decoder is mapped back to raw units.
    """
    parents = hierarchy_parents(synthetic_model)
    if not parents:
        raise ValueError(
            "synthetic_model has no feature hierarchy with parents, so absorption "
            "is undefined; configure SyntheticModelConfig.hierarchy"
        )
    if feature_acts.is_sparse:
        feature_acts = feature_acts.to_dense()
    if hidden is None:
        hidden = synthetic_model.feature_dict(feature_acts)
    if hidden.shape[0] != feature_acts.shape[0]:
        raise ValueError(
            f"hidden has {hidden.shape[0]} rows and feature_acts "
            f"{feature_acts.shape[0]}; they must come from one draw"
        )
    n = hidden.shape[0]
    if batch_size is None:
        batch_size = n
    check_range("batch_size", batch_size, low=1)
    counter = AbsorptionCounter(
        decoder_in_input_units(W_dec.detach(), activation_scaler),
        synthetic_model.feature_dict.feature_vectors.detach(),
        parents,
        thresholds,
    )
    for start in range(0, n, batch_size):
        batch = hidden[start : start + batch_size]
        if activation_scaler is not None:
            batch = activation_scaler.scale(batch)
        counter.add(encode(batch), feature_acts[start : start + batch_size])
    return counter.result()
