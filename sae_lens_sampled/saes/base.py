"""What the three batch-level architectures share.

Training SAEs build on SAELens's ``TopKTrainingSAE`` (decoder-norm rescaling, the aux-k
loss, norm folding on export) and differ only in their batch rule, which the registry
entry names and :meth:`BatchLevelTrainingSAE.select` runs.
Inference SAEs are ``JumpReLUSAE``s (per-token ``encode`` with a per-feature
``threshold``) that also offer the architecture's batch rule as :meth:`encode_batch`.
"""

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.sae import (
    TrainCoefficientConfig,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from sae_lens.saes.topk_sae import TopKTrainingSAE, act_times_W_dec
from typing_extensions import override

from sae_lens_sampled._registry import rule_of
from sae_lens_sampled.checkpoints import fill_0_1_checkpoint

# Re-exported: the field checks live in a module free of torch and SAELens.
from sae_lens_sampled.checks import FieldValueError as FieldValueError
from sae_lens_sampled.checks import check_choice as check_choice
from sae_lens_sampled.checks import check_range as check_range
from sae_lens_sampled.global_batch import GlobalBatch, LocalBatch, PositionsBatch
from sae_lens_sampled.health import (
    LR_ADVICE,
    HealthReport,
    ReconstructionWindows,
    warn_unhealthy,
)
from sae_lens_sampled.losses import (
    aux_k_budget,
    aux_k_scale,
    dead_by_rate,
    fit_zipf_exponent,
    masked_topk_aux_acts,
    underutilised_mask,
)
from sae_lens_sampled.saes.buffers import buffer_from_bytes as buffer_from_bytes
from sae_lens_sampled.saes.buffers import (
    float64_kept,
    pack_exact_buffers,
    unpack_exact_buffers,
)
from sae_lens_sampled.saes.finite_inputs import (
    NONFINITE_APPLIED,
    add_nonfinite,
    check_batch_rule_input,
    check_finite,
)
from sae_lens_sampled.saes.sparse_encode import (
    SparseEncode,
    encoder_pre,
    positions_codes,
    selected_values,
    sparse_aux_recons,
)
from sae_lens_sampled.selection import batch_budget, fixed_shapes
from sae_lens_sampled.sparse import (
    DecoderNorms,
    SelectedEntries,
    SparseCodes,
    attach_values,
    column_stats,
    sparse_decode,
)
from sae_lens_sampled.thresholds import (
    THRESHOLD_MODES,
    FiringRate,
    ThresholdMode,
    ThresholdState,
    column_stats_dense,
)

AuxLoss = Literal["aux_k", "aux_zipf", "none"]

AUX_LOSSES: tuple[str, ...] = ("aux_k", "aux_zipf", "none")

FiniteCheck = Literal["every_step"]
FINITE_CHECKS: tuple[bool | str, ...] = (True, False, "every_step")


def is_default(cfg: Any, name: str) -> bool:
    """Whether dataclass ``cfg``'s field ``name`` holds its declared default."""
    for field in dataclasses.fields(cfg):
        if field.name != name:
            continue
        if field.default is not dataclasses.MISSING:
            return bool(getattr(cfg, name) == field.default)
        if field.default_factory is not dataclasses.MISSING:
            return bool(getattr(cfg, name) == field.default_factory())
    return False


def shown(cfg: Any, name: str) -> str:
    """``name=value`` for an error message, saying when the value is the default."""
    note = " (the default)" if is_default(cfg, name) else ""
    return f"{name}={getattr(cfg, name)!r}{note}"


@contextmanager
def noting_defaults(cfg: Any) -> Iterator[None]:
    """Add "(the default)" to a :class:`FieldValueError` whose value is the default.

    A value the user never set can still be out of range (``k`` against a small
    ``d_sae``); the message should say where it came from.
    """
    try:
        yield
    except FieldValueError as err:
        if is_default(cfg, err.name) and err.args:
            err.args = (f"{err.args[0]} (the default)", *err.args[1:])
        raise


def inverse_norms(norms: torch.Tensor) -> torch.Tensor:
    """``1 / norms``, with a zero norm taken as the smallest normal number.

    A zero decoder row ranks 0, so its codes are 0; the clamp keeps ``0 * (1 / 0)``
    from turning them into NaN.
    """
    return norms.clamp_min(torch.finfo(norms.dtype).tiny).reciprocal()


def check_input_width(x: torch.Tensor, cfg: Any) -> None:
    """Raise a ValueError unless ``x`` ends in ``cfg.d_in`` features.

    With ``reshape_activations="hook_z"`` the input may also end in
    ``[n_heads, d_head]`` with ``n_heads * d_head == d_in``.
    """
    if x.ndim >= 1 and x.shape[-1] == cfg.d_in:
        return
    hook_z = getattr(cfg, "reshape_activations", "none") == "hook_z"
    if hook_z and x.ndim >= 2 and x.shape[-1] * x.shape[-2] == cfg.d_in:
        return
    raise ValueError(
        f"expected activations of width d_in={cfg.d_in} in the last dimension, "
        f"got a tensor of shape {tuple(x.shape)}"
    )


def apply_to_last_dim(
    rule: Callable[[torch.Tensor], torch.Tensor], acts: torch.Tensor
) -> torch.Tensor:
    """Run a ``[n, d_sae]`` rule on ``[..., d_sae]`` input, pooling all leading dims."""
    return rule(acts.reshape(-1, acts.shape[-1])).reshape(acts.shape)


def _has_hooks(module: torch.nn.Module) -> bool:
    """Whether a hook point has hooks (which may edit what passes through it)."""
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
    )


class ArchitectureKey:
    """A config class that sets ``architecture_key`` gets an ``architecture()`` (SAELens's
    registry key) returning it; the shared bases keep SAELens's (abstract for
    training, ``"jumprelu"`` for inference)."""

    architecture_key: ClassVar[str]

    if TYPE_CHECKING:  # what __init_subclass__ adds to the configs that set the key

        @classmethod
        def architecture(cls) -> str: ...

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "architecture_key" in vars(cls):
            key = cls.architecture_key
            setattr(cls, "architecture", classmethod(lambda _: key))  # noqa: B010


@dataclass
class BatchLevelTrainingSAEConfig(ArchitectureKey, TrainingSAEConfig):
    """Fields shared by the plugin's training configs (see each subclass).

    Args:
        k (float): Mean number of active features per token; a batch of B tokens keeps
            ``round(k * B)`` entries. Must be in (0, d_sae].
        aux_loss (str): Auxiliary loss: ``"aux_k"`` (SAELens's aux-k loss on dead
            features), ``"aux_zipf"`` (aux-k on underutilised features) or ``"none"``.
        aux_loss_coefficient (float): Weight of the auxiliary loss (SAELens's name).
        aux_loss_warm_up_steps (int): Steps (>= 0) over which SAELens's trainer ramps
            the auxiliary-loss weight linearly from 0 to ``aux_loss_coefficient``
            (0: full weight from the first step, exactly as SAELens's aux-k loss).
        rescale_acts_by_decoder_norm (bool): Select on ``hidden_pre * ||W_dec||``, as
            SAELens's TopK family does; folded into the weights on export.
        threshold_mode (str): Per-token inference thresholds: ``"rate"`` (default;
            each feature fires per token as often as the batch rule selects it),
            ``"per_feature"`` or ``"global"`` (``sae_lens_sampled.thresholds``).
        topk_threshold_lr (float): EMA weight per step of the threshold state, in
            (0, 1] (SAELens BatchTopK's name).
        threshold_gain (float): Step gain of ``"rate"`` thresholds, in (0, 1].
        zipf_alpha (float): Exponent (> 0) of the Zipf law of target firing rates by
            usage rank, ``p_r ~ r ** -zipf_alpha`` (used by ``aux_zipf`` and by
            feature_choice's Zipf capacities).
        zipf_tau (float): ``aux_zipf`` counts a feature as underutilised when its
            firing rate is below ``zipf_tau`` times its Zipf target (>= 0; 0 leaves
            only the dead features).
        zipf_ema_tokens (int): Horizon, in tokens (> 0), of the per-feature firing-rate
            EMA; until that many tokens are seen it is the plain running mean.
        check_finite_inputs (bool | str): NaN/Inf in training batches. ``True``
            (default): eager on a CPU, checked before anything is updated; on an
            accelerator or under ``torch.compile``, checked on the device with no
            host sync and raised at the next SAELens logging step, save or
            checkpoint, or :meth:`~BatchLevelTrainingSAE.raise_if_nonfinite_inputs`
            call, when the bad batch has already updated the weights and state.
            ``"every_step"``: checked before anything is updated on every device
            (one device sync per step). ``False``: no check.
    """

    k: float = 100
    aux_loss: AuxLoss = "aux_k"
    aux_loss_coefficient: float = 1.0
    aux_loss_warm_up_steps: int = 0
    rescale_acts_by_decoder_norm: bool = True
    topk_threshold_lr: float = 0.03
    threshold_mode: ThresholdMode = "rate"
    threshold_gain: float = 0.1
    zipf_alpha: float = 1.0
    zipf_tau: float = 0.1
    zipf_ema_tokens: int = 1_000_000
    check_finite_inputs: bool | FiniteCheck = True

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[no-untyped-call]  # SAELens: unannotated
        with noting_defaults(self):
            self.validate()

    def validate(self) -> None:
        """Check every field; raise a ValueError naming the field and allowed range."""
        check_range("d_in", self.d_in, low=1)
        check_range("d_sae", self.d_sae, low=1)
        check_range("k", self.k, low=0, high=self.d_sae, low_inclusive=False)
        check_choice("aux_loss", self.aux_loss, AUX_LOSSES)
        check_range("aux_loss_coefficient", self.aux_loss_coefficient, low=0)
        check_range("aux_loss_warm_up_steps", self.aux_loss_warm_up_steps, low=0)
        check_range(
            "topk_threshold_lr",
            self.topk_threshold_lr,
            low=0,
            high=1,
            low_inclusive=False,
        )
        check_choice("threshold_mode", self.threshold_mode, THRESHOLD_MODES)
        check_range(
            "threshold_gain", self.threshold_gain, low=0, high=1, low_inclusive=False
        )
        check_range("zipf_alpha", self.zipf_alpha, low=0, low_inclusive=False)
        check_range("zipf_tau", self.zipf_tau, low=0)
        check_range("zipf_ema_tokens", self.zipf_ema_tokens, low=1)
        check_choice("check_finite_inputs", self.check_finite_inputs, FINITE_CHECKS)
        if self.aux_loss != "none" and self.normalize_activations in (
            "constant_norm_rescale",
            "layer_norm",
        ):
            # SAELens's aux-k loss raises on these at the first step with dead
            # features, possibly thousands of steps in; say so now.
            raise ValueError(
                f"{shown(self, 'aux_loss')} cannot be combined with "
                f"{shown(self, 'normalize_activations')}: the auxiliary "
                "reconstruction would be in normalized space; use aux_loss='none' or "
                "normalize_activations in ('none', 'expected_average_only_in')"
            )


class BatchLevelTrainingSAE(TopKTrainingSAE):
    """Training SAE whose activation is a batch-level selection rule.

    In training mode, ``encode`` applies :meth:`select` over every token it is given.
    In eval mode (SAELens evals, ``sae.eval()``), ``encode`` applies the learned
    per-token thresholds, i.e. what the saved inference SAE will do; use
    :meth:`encode_batch` for the batch rule in any mode. State is updated only in
    :meth:`training_forward_pass`, never in ``encode``.
    """

    cfg: BatchLevelTrainingSAEConfig  # type: ignore[assignment]
    running_threshold: torch.Tensor
    firing_rate: torch.Tensor
    n_tokens_seen: torch.Tensor

    # Training-only buffers, dropped from the inference state dict.
    training_buffers: tuple[str, ...] = (
        "firing_rate",
        "n_tokens_seen",
        *ThresholdState.training_buffers,
    )
    # Set only inside a data-parallel training step: select and update the state
    # from the global batch.
    data_parallel: GlobalBatch | None = None
    # The sparse path's entries of the codes the last training encode returned.
    selected_entries: SelectedEntries | None = None
    # The last sparse training encode's dense pieces, for a sparse aux loss.
    sparse_encode: SparseEncode | None = None
    # add_nonfinite's sum over the checked training batches, on their device. Not a
    # buffer: never saved, never left on the meta device by SAELens's loader.
    _nonfinite_sum: torch.Tensor | None = None
    # (buffer, its in-place version, its value) of the last read of
    # n_selection_steps: see host_step_count.
    _step_mirror: tuple[torch.Tensor, int, int] | None = None

    def __init__(self, cfg: BatchLevelTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)  # type: ignore[arg-type]
        device = self.W_dec.device
        # Per-token inference thresholds (`running_threshold`) and their update rule.
        self.thresholds = ThresholdState(self, cfg.d_sae, device)
        # Fraction of tokens on which each feature is selected (EMA over
        # zipf_ema_tokens tokens), and the token count that de-biases its warm-up.
        self.register_buffer(
            "firing_rate", torch.zeros(cfg.d_sae, dtype=torch.float64, device=device)
        )
        self.register_buffer(
            "n_tokens_seen", torch.zeros((), dtype=torch.float64, device=device)
        )
        if "n_selection_steps" in self.training_buffers:
            # Training steps taken, for the rules that depend on the step count
            # (host_step_count): kept across resumes.
            self.register_buffer(
                "n_selection_steps", torch.zeros((), dtype=torch.long, device=device)
            )
        # Training MSE by window of steps (health.py); not saved in checkpoints.
        self.reconstruction = ReconstructionWindows()

    # --- The batch rule -------------------------------------------------------------
    def select(
        self, acts: torch.Tensor, batch: LocalBatch | None = None
    ) -> torch.Tensor:
        """The batch rule (the registry entry's) on post-ReLU activations
        ``[n_tokens, d_sae]`` of one process (``batch``: these rows' batch, by
        default a plain :class:`LocalBatch`)."""
        batch = LocalBatch(acts.shape[0]) if batch is None else batch
        return rule_of(self.cfg.architecture())(self, acts, batch)

    def selected_columns(self) -> torch.Tensor | None:
        """The columns (ascending) that the last training selection's batch top-k
        ran over, when not every feature (e.g. a pool); None: every feature."""
        return None

    def max_selected(self, n_tokens: int) -> int:
        """The most entries the batch rule keeps in a batch of ``n_tokens`` tokens:
        its budget ``round(k * n_tokens)``, at most every entry."""
        return min(batch_budget(self.cfg.k, n_tokens), n_tokens * self.cfg.d_sae)

    @override
    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        # A bound method, not a closure, so that copy.deepcopy rebinds it to the copy.
        return self.batch_rule

    def batch_rule(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        """:meth:`select` on ``relu(hidden_pre)`` of any leading shape."""
        if self.data_parallel is not None:
            return apply_to_last_dim(
                partial(self.data_parallel.select, self), hidden_pre.relu()
            )
        return apply_to_last_dim(self.select, hidden_pre.relu())

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # With use_error_term, SAELens encodes x a second time for the error term; both
        # encodes of one forward must make the same selection for sae(x) to equal x.
        with self.one_selection_draw():
            return super().forward(x)

    def one_selection_draw(self) -> AbstractContextManager[None]:
        """A context in which repeated selections on the same input agree (a rule
        that draws at random overrides this; others are functions of their input)."""
        return nullcontext()

    # --- Encode and decode ----------------------------------------------------------
    def hidden_pre(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations in the units the selection and thresholds use."""
        check_input_width(x, self.cfg)
        sae_in = self.process_sae_in(x)
        hidden_pre: torch.Tensor = self.hook_sae_acts_pre(
            sae_in @ self.W_enc + self.b_enc
        )
        if self.cfg.rescale_acts_by_decoder_norm:
            hidden_pre = hidden_pre * self.W_dec.norm(dim=-1)
        return hidden_pre

    def threshold_acts(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        """Per-token JumpReLU rule with the learned thresholds (inference encode)."""
        threshold = self.running_threshold.to(hidden_pre.dtype)
        return hidden_pre.relu() * (hidden_pre > threshold)

    @override
    def encode_with_hidden_pre(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The sparse path decodes from the selected values, not from the tensor that
        # hook_sae_acts_post passes on: a hook there (e.g. one that calls retain_grad)
        # needs the dense path to see its gradient. An empty batch has nothing to gain.
        if (
            self.training
            and not _has_hooks(self.hook_sae_acts_pre)
            and not _has_hooks(self.hook_sae_acts_post)
            and x.numel() > 0
        ):
            return self._encode_sparse(x)
        hidden_pre = self.hidden_pre(x)
        if self.training:
            feature_acts = self.activation_fn(hidden_pre)
        else:
            feature_acts = self.threshold_acts(hidden_pre)
        return self.hook_sae_acts_post(feature_acts), hidden_pre

    def _encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training encode whose codes carry their selected entries for :meth:`decode`.

        Same values as the dense path; the selection is made without grad, and the
        selected values get their gradient through ``gather_linear``, so neither
        the loss nor its backward touches the ``[n, d_sae]`` matrix. ``hidden_pre``
        stays dense and differentiable (aux losses read it).
        """
        check_input_width(x, self.cfg)
        sae_in = self.process_sae_in(x)
        pre = self.hook_sae_acts_pre(encoder_pre(sae_in, self.W_enc, self.b_enc))
        hidden_pre = pre
        # One decoder-norm computation per step: the rescaled hidden_pre, the
        # selected values and decode's inverse norms all read it.
        norms = None
        if self.cfg.rescale_acts_by_decoder_norm:
            norms = self.W_dec.norm(dim=-1)
            hidden_pre = pre * norms
        with torch.no_grad():
            if self.data_parallel is None and fixed_shapes(hidden_pre):
                selected, codes = self._select_fixed(hidden_pre.detach())
            else:
                selected = self.activation_fn(hidden_pre.detach())
                codes = SparseCodes.from_dense(selected.flatten(end_dim=-2))
        pre, sae_in = pre.flatten(end_dim=-2), sae_in.flatten(end_dim=-2)
        values, entry_norms = selected_values(
            pre, sae_in, self.W_enc, self.b_enc, codes, norms
        )
        feature_acts = attach_values(values, selected, codes)
        self.selected_entries = SelectedEntries.of(
            feature_acts, codes, values, DecoderNorms.of(self.W_dec, entry_norms)
        )
        self.sparse_encode = SparseEncode(hidden_pre, pre, sae_in)
        return self.hook_sae_acts_post(feature_acts), hidden_pre

    def _select_fixed(
        self, hidden_pre: torch.Tensor
    ) -> tuple[torch.Tensor, SparseCodes]:
        """The batch rule on ``relu(hidden_pre)`` and the codes of what it kept, with
        fixed shapes (no host read): see :func:`positions_codes`."""
        acts = hidden_pre.relu().flatten(end_dim=-2)
        n_tokens, d_sae = acts.shape
        batch = PositionsBatch(n_tokens, self.max_selected(n_tokens))
        selected = self.select(acts, batch)
        columns = self.selected_columns() if batch.width != d_sae else None
        codes = positions_codes(selected, batch, columns)
        return selected.reshape(hidden_pre.shape), codes

    def entries_of(self, feature_acts: torch.Tensor) -> SelectedEntries | None:
        """The selected entries of ``feature_acts`` when the last training encode
        returned this very tensor, unmodified (the sparse path); else None."""
        entries = self.selected_entries
        return (
            entries if entries is not None and entries.describe(feature_acts) else None
        )

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        # Codes are in units of hidden_pre * ||W_dec||, so decoding divides by the
        # norms; the sparse path reuses the ones its encode computed.
        rescale = self.cfg.rescale_acts_by_decoder_norm
        entries = self.entries_of(feature_acts)
        if entries is None:
            if rescale:
                feature_acts = feature_acts * inverse_norms(self.W_dec.norm(dim=-1))
            sae_out_pre = act_times_W_dec(feature_acts, self.W_dec, False) + self.b_dec
        else:
            codes, values = entries.codes, entries.values
            if rescale:
                norms = entries.norms_of_entries(self.W_dec)
                values = values * inverse_norms(norms)
            sae_out_pre = sparse_decode(values, self.W_dec, codes) + self.b_dec
            if feature_acts.dim() != 2:
                sae_out_pre = sae_out_pre.reshape(
                    *feature_acts.shape[:-1], self.W_dec.shape[1]
                )
        sae_out_pre = self.hook_sae_recons(sae_out_pre)
        # SAELens assigns these two as unannotated functions in SAE.__init__.
        sae_out_pre = self.run_time_activation_norm_fn_out(sae_out_pre)  # type: ignore[has-type]
        sae_out: torch.Tensor = self.reshape_fn_out(sae_out_pre, self.d_head)  # type: ignore[no-untyped-call]
        return sae_out

    def encode_batch(self, x: torch.Tensor) -> torch.Tensor:
        """The batch rule over every token of ``x`` (any leading shape), in any mode.

        Raises a ValueError on NaN or Inf input (the rule ranks all tokens together).
        """
        check_batch_rule_input(x)
        acts: torch.Tensor = self.hook_sae_acts_post(
            self.activation_fn(self.hidden_pre(x))
        )
        return acts

    # --- The training step ----------------------------------------------------------
    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        check_input_width(step_input.sae_in, self.cfg)
        check = self.cfg.check_finite_inputs
        # True defers the error on an accelerator or under compile (no read);
        # eager on a CPU a read costs nothing: stop before the batch is applied.
        deferred = check is True and fixed_shapes(step_input.sae_in)
        if deferred:
            self.note_nonfinite_inputs(step_input.sae_in)
        elif check:  # "every_step", or True on a CPU
            check_finite(step_input.sae_in)
        output = super().training_forward_pass(step_input)
        if deferred:
            # SAELens evaluates metric callables on logging steps only.
            output.metrics["inputs_finite"] = self.raise_if_nonfinite_inputs
        fire_rates = self.update_state(output.feature_acts, output.hidden_pre)
        # Callables: SAELens evaluates them on logging steps only, so other steps
        # never sync. They read the state as updated by this batch.
        output.metrics.update(self.thresholds.metrics(fire_rates))
        firing_rate, n_tokens_seen = self.firing_rate, self.n_tokens_seen
        dead_mask = step_input.dead_neuron_mask
        output.metrics["underutilised_features"] = lambda: self.underutilised(
            dead_mask
        ).sum()
        output.metrics["zipf_exponent"] = lambda: fit_zipf_exponent(firing_rate)
        output.metrics["dead_features_by_rate"] = lambda: dead_by_rate(
            firing_rate, n_tokens_seen, self.cfg.zipf_ema_tokens
        ).sum()
        self.reconstruction.add(output.losses["mse_loss"])
        # logged as metrics/mse_window_change (NaN before two full windows)
        output.metrics["mse_window_change"] = self.reconstruction.logged_change
        k = self.cfg.k
        output.metrics["l0_per_token_drift"] = lambda: fire_rates.sum() / k - 1
        return output

    @override
    def get_coefficients(self) -> dict[str, TrainCoefficientConfig | float]:
        # SAELens's trainer schedules each entry and hands the current value back in
        # step_input.coefficients (and logs it as details/aux_loss_coefficient_coefficient).
        if self.cfg.aux_loss == "none":
            return {}
        return {
            "aux_loss_coefficient": TrainCoefficientConfig(
                value=self.cfg.aux_loss_coefficient,
                warm_up_steps=self.cfg.aux_loss_warm_up_steps,
            )
        }

    @override
    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        if self.cfg.aux_loss == "none":
            return {}
        # The trainer passes the scheduled weight; direct callers may pass none.
        coefficient = step_input.coefficients.get(
            "aux_loss_coefficient", self.cfg.aux_loss_coefficient
        )
        mask = self.aux_dead_features(step_input.dead_neuron_mask)
        if self.cfg.aux_loss == "aux_zipf":
            mask = self.underutilised(mask)
        elif mask is None or (
            # On a CPU the read is free, and with no dead feature nothing is done.
            not fixed_shapes(hidden_pre) and not bool(mask.any())
        ):
            return {"auxiliary_reconstruction_loss": sae_out.new_tensor(0.0)}
        loss = self.calculate_masked_aux_loss(
            step_input.sae_in, sae_out, hidden_pre, mask, coefficient
        )
        return {"auxiliary_reconstruction_loss": loss}

    def aux_dead_features(
        self, dead_neuron_mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The dead set of the aux losses: the trainer's ``dead_neuron_mask`` here."""
        return dead_neuron_mask

    @torch.no_grad()
    def underutilised(
        self, dead_neuron_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """aux_zipf's set: features firing below ``zipf_tau`` times their Zipf target.

        Targets follow the features' current usage ranks in ``firing_rate``; the
        trainer's ``dead_neuron_mask``, if given, is joined in.
        """
        return underutilised_mask(
            self.firing_rate,
            self.cfg.k,
            self.cfg.zipf_alpha,
            self.cfg.zipf_tau,
            dead_neuron_mask,
        )

    def calculate_masked_aux_loss(
        self,
        sae_in: torch.Tensor,
        sae_out: torch.Tensor,
        hidden_pre: torch.Tensor,
        mask: torch.Tensor,
        coefficient: float,
    ) -> torch.Tensor:
        """SAELens's ``calculate_topk_aux_loss`` with ``mask`` as the dead set, and
        no sync: the top ``d_in // 2`` has a fixed size, picks outside ``mask`` are
        zeroed, ``min(|mask| / (d_in // 2), 1)`` stays on the device (an empty mask
        gives 0); sparse on the sparse path (:func:`sparse_aux_recons`)."""
        if self.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            raise ValueError(
                f"aux_loss={self.cfg.aux_loss!r} does not support "
                f"normalize_activations={self.cfg.normalize_activations!r} (as "
                "SAELens's aux-k loss: the reconstruction would be in normalized "
                "space, the residual is not)"
            )
        with torch.no_grad():
            residual = sae_in - sae_out
        d_in = sae_in.shape[-1]
        k_aux = aux_k_budget(d_in, hidden_pre.shape[-1])
        encode = self.sparse_encode
        if encode is not None and encode.hidden_pre is hidden_pre:
            recons = sparse_aux_recons(
                encode, mask, k_aux, self.W_enc, self.b_enc, self.W_dec
            )
        else:
            aux_acts = masked_topk_aux_acts(hidden_pre, mask, k_aux)
            recons = act_times_W_dec(
                aux_acts, self.W_dec, self.cfg.rescale_acts_by_decoder_norm
            )
        recons = self.reshape_fn_out(recons, self.d_head)  # type: ignore[no-untyped-call]
        # sum over d_in, mean over tokens, as one op (and one in backward)
        n_rows = residual.numel() // max(residual.shape[-1], 1)
        aux_loss = F.mse_loss(recons, residual, reduction="sum") / n_rows
        scale = aux_k_scale(mask, d_in).to(aux_loss.dtype)
        return coefficient * scale * aux_loss

    # --- Training state -------------------------------------------------------------
    @torch.no_grad()
    def update_state(
        self, feature_acts: torch.Tensor, hidden_pre: torch.Tensor
    ) -> torch.Tensor:
        """Update firing rates and thresholds (and subclass state) from a batch.

        Reads per-feature counts and smallest positive selections: from the selected
        entries when the codes carry them (the training fast path, O(selected)), else
        from the dense codes. Returns each feature's per-token fire rate.
        """
        entries = self.entries_of(feature_acts)
        if entries is not None:
            counts, smallest = column_stats(entries.codes, entries.values)
            n_tokens = entries.codes.n_rows
        else:
            dense = feature_acts.detach().flatten(end_dim=-2)
            counts, smallest = column_stats_dense(dense)
            n_tokens = dense.shape[0]
        if self.data_parallel is not None:
            counts, smallest, n_tokens = self.data_parallel.column_stats(
                counts, smallest, n_tokens
            )
        # autocast would run the EMAs in low precision
        with torch.autocast(self.W_dec.device.type, enabled=False):
            self.n_tokens_seen += n_tokens
            # The firing rates move in one group with the thresholds' own EMAs.
            firing_rate = FiringRate(self.firing_rate, self.cfg.zipf_ema_tokens)
            fire_rates = self.thresholds.update(
                hidden_pre,
                counts,
                smallest,
                n_tokens,
                self.data_parallel,
                firing_rates=[firing_rate, *self.usage_rates(hidden_pre)],
            )
        if "n_selection_steps" in self.training_buffers:
            self.advance_step_count()
        self.update_rule_state(feature_acts, counts)
        return fire_rates

    def usage_rates(self, hidden_pre: torch.Tensor) -> list[FiringRate]:  # noqa: ARG002
        """More per-feature rate EMAs of the batch rule, with this batch's counts, for
        :meth:`update_state` to move along with ``firing_rate`` (none here)."""
        return []

    def update_rule_state(
        self, feature_acts: torch.Tensor, counts: torch.Tensor
    ) -> None:
        """The batch rule's own state, after :meth:`update_state` has counted the
        step in ``n_selection_steps`` (for the rules that keep it; none here).

        ``counts``: each feature's positive selections in the (global) batch.
        """

    def set_thresholds(self, thresholds: torch.Tensor) -> None:
        self.thresholds.set(thresholds)

    def host_step_count(self) -> int:
        """``n_selection_steps`` as a host int, read from the device only when the
        mirror is stale: :meth:`advance_step_count` moves both, and any other change
        (a load, ``fill_``, a copy of the module) bumps the buffer's in-place version
        or replaces it."""
        buffer: torch.Tensor = getattr(self, "n_selection_steps")  # noqa: B009
        mirror = self._step_mirror
        if mirror is not None and mirror[0] is buffer and mirror[1] == buffer._version:
            return mirror[2]
        step = int(buffer)
        self._step_mirror = (buffer, buffer._version, step)
        return step

    @torch.no_grad()
    def advance_step_count(self) -> None:
        """Add one to ``n_selection_steps`` and to its host mirror."""
        buffer: torch.Tensor = getattr(self, "n_selection_steps")  # noqa: B009
        if torch.compiler.is_compiling():
            # A host int that changes every step would recompile every step: the
            # mirror goes stale (the buffer's version moves) and eager code reads
            # the buffer again when it needs it.
            buffer += 1
            return
        step = self.host_step_count()
        buffer += 1
        self._step_mirror = (buffer, buffer._version, step + 1)

    @property
    def inputs_finite(self) -> torch.Tensor | None:
        """False once a training batch held NaN or Inf (``check_finite_inputs=True``),
        as a device tensor; None before the first checked batch."""
        total = self._nonfinite_sum
        return None if total is None else total == 0

    @torch.no_grad()
    def note_nonfinite_inputs(self, x: torch.Tensor) -> None:
        """Clear :attr:`inputs_finite` if ``x`` holds NaN or Inf, on the device."""
        self._nonfinite_sum = add_nonfinite(self._nonfinite_sum, x)

    def raise_if_nonfinite_inputs(self) -> torch.Tensor:
        """Raise a ValueError if a training batch held NaN or Inf since this SAE was
        built (``check_finite_inputs=True``); else return True as a tensor. One host
        sync."""
        finite = self.inputs_finite
        if finite is None:
            return torch.ones((), dtype=torch.bool)
        if not bool(finite):
            raise ValueError(NONFINITE_APPLIED)
        return finite

    def health(self) -> HealthReport:
        """Whether reconstruction improved over the last window, and the per-token
        L0 (EMA of the end of training) against k. One host sync."""
        token_rate = self.thresholds.token_rate
        started = bool(self.thresholds.selection_rate.any())
        return HealthReport(
            mse_change=self.reconstruction.change(),
            window_steps=self.reconstruction.window,
            l0_per_token=float(token_rate.sum()) if started else None,
            k=float(self.cfg.k),
            mse_advice=self.mse_rise_advice(),
        )

    def mse_rise_advice(self) -> str:
        """The likely cause of a rising training MSE and the setting to change."""
        return LR_ADVICE

    def record_health(self, metadata: Any) -> HealthReport:
        """Write :meth:`health` into SAELens ``metadata``: ``reconstruction_improved``
        (None before two windows), ``mse_window_change`` and ``l0_per_token_drift``."""
        report = self.health()
        metadata.reconstruction_improved = report.reconstruction_improved
        metadata.mse_window_change = report.mse_change
        metadata.l0_per_token_drift = report.l0_drift
        return report

    # --- Folding, saving and loading ------------------------------------------------
    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        super().fold_activation_norm_scaling_factor(scaling_factor)
        if self.cfg.rescale_acts_by_decoder_norm:
            # Thresholds are in units of hidden_pre * ||W_dec||, and the fold just
            # divided W_dec by the scaling factor.
            self.thresholds.rescale(1 / scaling_factor)

    @override
    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Any:
        # `.to(dtype)` (which SAELens's load_from_disk ends with) would cast the
        # float64 EMA buffers down; let them follow device moves but keep float64.
        with float64_kept(self):
            return super()._apply(fn, recurse)  # type: ignore[no-untyped-call]  # torch

    @override
    def process_state_dict_for_saving_inference(
        self, state_dict: dict[str, Any]
    ) -> None:
        if self.cfg.check_finite_inputs is True:
            self.raise_if_nonfinite_inputs()
        threshold = state_dict.pop("running_threshold")
        for name in self.training_buffers:
            state_dict.pop(name)
        self.thresholds.record_metadata(self.cfg.metadata)
        # The end of training: say so if the run is not learning.
        warn_unhealthy(
            self.record_health(self.cfg.metadata),
            f"{type(self).__name__}",
            threshold_gain=self.cfg.threshold_gain,
        )
        # TopK's version folds the decoder norms into W_enc and b_enc, which puts the
        # inference hidden_pre in the units the thresholds were learned in.
        super().process_state_dict_for_saving_inference(state_dict)
        state_dict["threshold"] = threshold.to(state_dict["b_enc"].dtype)

    @override
    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        if self.cfg.check_finite_inputs is True:
            self.raise_if_nonfinite_inputs()
        super().process_state_dict_for_saving(state_dict)
        self.thresholds.record_metadata(self.cfg.metadata)
        self.record_health(self.cfg.metadata)
        # float64 EMAs and int64 counters as raw bytes (saes/buffers.py).
        pack_exact_buffers(state_dict, self)

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_loading(state_dict)
        buffers = {name: getattr(self, name) for name in self.training_buffers}
        fill_0_1_checkpoint(state_dict, buffers, self.cfg.architecture())
        unpack_exact_buffers(state_dict, self)
        # SAELens's loader casts every tensor to the SAE dtype; keep the count whole.
        steps = state_dict.get("n_selection_steps")
        if steps is not None and steps.is_floating_point():
            state_dict["n_selection_steps"] = steps.round().long()


@dataclass
class BatchLevelSAEConfig(ArchitectureKey, JumpReLUSAEConfig):
    """Fields shared by the plugin's inference configs.

    Args:
        k (float): Mean active features per token of the batch rule (``encode_batch``).
    """

    k: float = 100

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[no-untyped-call]  # SAELens: unannotated
        with noting_defaults(self):
            check_range("k", self.k, low=0, high=self.d_sae, low_inclusive=False)


class BatchLevelSAE(JumpReLUSAE):
    """Inference SAE: per-token JumpReLU ``encode`` plus the batch rule.

    ``encode`` is a plain SAELens JumpReLU encode with the per-feature ``threshold``
    learned during training, so any token is encoded alone, for any leading shape, and
    a NaN or Inf in one token changes that token's codes only. ``encode_batch``
    applies the architecture's training rule over all tokens given.

    The batch rule ranks ``relu(hidden_pre) * rank_scale``. ``rank_scale`` (a
    per-feature buffer) starts at 1: the saved encoder already computes the values
    training ranked, in every configuration (decoder norms folded in on export when
    training rescaled by them; SAELens's end-of-training folds keep the pre-activations
    of the raw input equal to those training saw). Folds on this SAE that rescale a
    feature's pre-activations (``fold_W_dec_norm``) divide its ``rank_scale`` by the
    same factor, so the selection never changes. Files saved without it (all files
    from training, and from earlier versions) load with 1.
    """

    cfg: BatchLevelSAEConfig
    rank_scale: torch.Tensor

    def __init__(self, cfg: BatchLevelSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.register_buffer(
            "rank_scale",
            torch.ones(cfg.d_sae, dtype=self.dtype, device=self.W_dec.device),
        )

    def select_ranked(self, ranking: torch.Tensor) -> torch.Tensor:
        """The training rule (the registry entry's) on ranking values
        ``[n_tokens, d_sae]``: the values where selected, 0 elsewhere."""
        rule = rule_of(self.cfg.architecture())
        return rule(self, ranking, LocalBatch(ranking.shape[0]))

    def select(self, acts: torch.Tensor) -> torch.Tensor:
        """The batch rule on post-ReLU activations ``[n_tokens, d_sae]`` in this SAE's
        units: ranks ``acts * rank_scale``, returns ``acts`` where selected."""
        ranked = self.select_ranked(acts * self.rank_scale.to(acts.dtype))
        return acts * (ranked != 0)

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        check_input_width(x, self.cfg)
        return super().encode(x)

    def hidden_pre(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations, in the units of ``threshold``."""
        check_input_width(x, self.cfg)
        sae_in = self.process_sae_in(x)
        hidden_pre: torch.Tensor = self.hook_sae_acts_pre(
            sae_in @ self.W_enc + self.b_enc
        )
        return hidden_pre

    def encode_batch(self, x: torch.Tensor) -> torch.Tensor:
        """The batch rule over every token of ``x`` (any leading shape).

        Selects what the training SAE selected on the same input, ranking
        ``relu(hidden_pre) * rank_scale`` (with decoder-norm rescaling, up to the
        rounding of the export's fold: ``docs/reliability.md``); the codes are in
        JumpReLU's units, those of ``encode``. Raises a ValueError on NaN or Inf
        input, since the rule ranks all tokens together.
        """
        check_batch_rule_input(x)
        acts: torch.Tensor = self.hook_sae_acts_post(
            apply_to_last_dim(self.select, self.hidden_pre(x).relu())
        )
        return acts

    @override
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        # JumpReLU's fold multiplies feature j's pre-activation (and threshold) by
        # its decoder norm; the batch rule must keep ranking the unfolded values.
        norms = self.get_W_dec_norm()
        super().fold_W_dec_norm()  # type: ignore[no-untyped-call]  # SAELens: unannotated
        self.rank_scale.div_(norms.to(self.rank_scale.dtype))

    @override
    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # Files from training (and from before rank_scale existed) carry none: their
        # encoder computes the training ranking values as is.
        key = prefix + "rank_scale"
        if key not in state_dict and prefix + "W_dec" in state_dict:
            like = state_dict[prefix + "W_dec"]
            state_dict[key] = torch.ones(
                like.shape[0], dtype=like.dtype, device=like.device
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def set_thresholds(self, thresholds: torch.Tensor) -> None:
        self.threshold.data.copy_(thresholds.to(self.threshold))
