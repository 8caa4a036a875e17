"""``DistributedSAETrainer``: SAELens's ``SAETrainer`` for data-parallel training.

``docs/distributed.md`` says what each step exchanges and why the result equals one
process's ("The guarantee"). Without a process group it trains like ``SAETrainer``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import wandb
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import (
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from sae_lens.training.activation_scaler import ActivationScaler, ActivationWhitening
from sae_lens.training.sae_trainer import Evaluator, SAETrainer, SaveCheckpointFn
from sae_lens.training.types import DataProvider
from tqdm.auto import tqdm
from typing_extensions import override

from sae_lens_sampled.checks import check_range
from sae_lens_sampled.distributed.comm import Comm
from sae_lens_sampled.distributed.same_config import (
    Description,
    check_same_settings,
    describe_dataclass,
    describe_settings,
)
from sae_lens_sampled.distributed.step import DataParallelStep, data_parallel_step


class GlobalActivationScaler(ActivationScaler):
    """SAELens's ``ActivationScaler`` whose estimates pool the batches of every rank."""

    def __init__(self, comm: Comm) -> None:
        super().__init__()
        self.comm = comm

    @override
    @torch.no_grad()
    def estimate_scaling_factor(
        self,
        d_in: int,
        data_provider: DataProvider,
        n_batches_for_norm_estimate: int = int(1e3),
    ) -> None:
        total = torch.zeros(2, dtype=torch.float64)
        for _ in range(n_batches_for_norm_estimate):
            norms = next(data_provider).norm(dim=-1)
            total[0] += norms.double().sum().cpu()
            total[1] += norms.numel()
        total = self.comm.all_reduce(total.to(self._device()), "sum", "setup").cpu()
        self.scaling_factor = (d_in**0.5) / float(total[0] / total[1])

    @override
    @torch.no_grad()
    def estimate_whitening(
        self,
        d_in: int,
        data_provider: DataProvider,
        n_batches_for_norm_estimate: int = int(1e3),
        eps: float = 1e-3,
    ) -> None:
        # Sums of x and x x^T over every rank's batches; then the eigen-decomposition
        # of the covariance, as SAELens's scaler does in one process.
        device = self._device()
        sums = torch.zeros(1 + d_in + d_in * d_in, dtype=torch.float64, device=device)
        for _ in range(n_batches_for_norm_estimate):
            acts = next(data_provider).to(device, torch.float64).reshape(-1, d_in)
            sums[0] += acts.shape[0]
            sums[1 : 1 + d_in] += acts.sum(dim=0)
            sums[1 + d_in :] += (acts.T @ acts).reshape(-1)
        self.comm.all_reduce(sums, "sum", "setup")
        count = float(sums[0])
        mean = sums[1 : 1 + d_in] / count
        outer = sums[1 + d_in :].reshape(d_in, d_in)
        cov = (outer - count * torch.outer(mean, mean)) / (count - 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        eigenvalues = eigenvalues.clamp(min=0) + eps
        inverse = eigenvalues.sqrt().unsqueeze(1) * eigenvectors.T
        self.whitening = ActivationWhitening(
            mean=mean.cpu(),
            matrix=(eigenvectors * eigenvalues.rsqrt()).contiguous().cpu(),
            inverse_matrix=inverse.contiguous().cpu(),
        )

    def _device(self) -> torch.device:
        # NCCL reduces device tensors only.
        if self.comm.active and torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def describe_training(sae: TrainingSAE[Any], cfg: SAETrainerConfig) -> Description:
    """What must be equal on every rank: the SAE's config and state shapes, and the
    trainer's config (not its log or checkpoint destinations, which rank 0 uses, nor
    the SAE's metadata, which repeats its fields and describes the data source)."""
    sae_settings = {
        name: value
        for name, value in sae.cfg.to_dict().items()
        if name not in ("architecture", "metadata")
    }
    trainer = [
        (name, value)
        for name, value in describe_dataclass(cfg, "trainer.")
        if not name.startswith(("trainer.logger.", "trainer.checkpoint_path"))
    ]
    architecture = {"architecture": sae.cfg.architecture()}
    state = [  # the shape and dtype of every parameter and buffer
        (f"state.{name}", f"{list(tensor.shape)} {str(tensor.dtype)[6:]}")
        for name, tensor in sae.state_dict().items()
    ]
    return [
        *describe_settings({**architecture, **sae_settings}, "sae."),
        *state,
        *trainer,
    ]


@torch.no_grad()
def average_gradients(parameters: list[torch.nn.Parameter], comm: Comm) -> None:
    """Average ``.grad`` over ranks in place (a missing grad counts as zeros)."""
    if not comm.active:
        return
    for param in parameters:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        comm.all_reduce(param.grad, "sum", "gradients")
        param.grad.div_(comm.world_size)


class DistributedSAETrainer(SAETrainer[TrainingSAE[Any], TrainingSAEConfig]):
    """SAELens's ``SAETrainer`` over a batch split across ``torch.distributed`` ranks.

    Args:
        cfg: SAELens's trainer config for the global run (``train_batch_size_samples``
            is the global batch, a multiple of the world size).
        sae: One of the plugin's SAEs, or any architecture with a rule registered by
            :func:`~.step.register_data_parallel_rule`.
        data_provider: This rank's batches of ``train_batch_size_samples //
            world_size`` rows.
        evaluator: Run on rank 0 only.
        save_checkpoint_fn: Called on every rank at each checkpoint.
        group: Process group (default: the default group if initialised).
        comm: A :class:`~.comm.Comm` to use instead of one over ``group``.
        oversample: Candidates each rank sends for the global top-k, as a multiple of
            its even share (any value >= 1 is exact; see :mod:`.global_select`).
        check_replicas_every: Every this many steps, check that parameters and
            buffers are identical on all ranks and raise if not (0: never).
    """

    def __init__(
        self,
        cfg: SAETrainerConfig,
        sae: TrainingSAE[Any],
        data_provider: DataProvider,
        evaluator: Evaluator[TrainingSAE[Any]] | None = None,
        save_checkpoint_fn: SaveCheckpointFn | None = None,
        *,
        group: dist.ProcessGroup | None = None,
        comm: Comm | None = None,
        oversample: float = 2.0,
        check_replicas_every: int = 0,
    ) -> None:
        self.comm = Comm(group) if comm is None else comm
        world = self.comm.world_size
        if cfg.train_batch_size_samples % world != 0:
            raise ValueError(
                f"train_batch_size_samples={cfg.train_batch_size_samples} must be a "
                f"multiple of the world size {world}"
            )
        if oversample < 1:
            raise ValueError(f"oversample must be >= 1, got {oversample}")
        check_range("check_replicas_every", check_replicas_every, low=0)
        self.local_batch_size = cfg.train_batch_size_samples // world
        self.oversample = oversample
        self.check_replicas_every = check_replicas_every
        check_same_settings(
            self.comm, describe_training(sae, cfg), "SAE and trainer config"
        )
        sae.to(cfg.device)
        with torch.no_grad():  # every parameter and buffer from rank 0
            for tensor in [*sae.parameters(), *sae.buffers()]:
                self.comm.broadcast(tensor.data, 0, "setup")
        super().__init__(cfg, sae, data_provider, evaluator, save_checkpoint_fn)
        self.activation_scaler = GlobalActivationScaler(self.comm)

    @property
    def is_main(self) -> bool:
        return self.comm.rank == 0

    @override
    def fit(self) -> TrainingSAE[Any]:
        self.sae.to(self.cfg.device)
        pbar = tqdm(
            total=self.cfg.total_training_samples,
            initial=self.n_training_samples,
            desc="Training SAE",
            disable=not self.is_main,
        )
        self._estimate_activation_statistics()
        while self.n_training_samples < self.cfg.total_training_samples:
            self._log(self.maybe_reset_sparsity())
            step_output = self.step(next(self.data_provider))
            if self.cfg.logger.log_to_wandb:
                self._log_train_step(step_output)
                self._run_and_log_evals()
            self._checkpoint_if_needed()  # type: ignore[no-untyped-call]  # SAELens: unannotated
            self.n_training_steps += 1
            self._check_replicas()
            self._update_pbar(step_output, pbar)
        self._log(self.full_sparsity_window_log())
        self._fold_activation_statistics()
        self.set_final_sae_metadata()
        if self.cfg.save_final_checkpoint:
            self.save_checkpoint(checkpoint_name=f"final_{self.n_training_samples}")
        pbar.close()
        return self.sae

    def _estimate_activation_statistics(self) -> None:
        # Statistics loaded from a checkpoint are kept, as SAELens's trainer does.
        scaler = self.activation_scaler
        n_batches = self.cfg.n_batches_for_norm_estimate
        normalize = self.sae.cfg.normalize_activations
        if normalize == "expected_average_only_in" and scaler.scaling_factor is None:
            scaler.estimate_scaling_factor(
                self.sae.cfg.d_in, self.data_provider, n_batches
            )
        elif normalize == "covariance_whitening" and scaler.whitening is None:
            scaler.estimate_whitening(self.sae.cfg.d_in, self.data_provider, n_batches)

    def _fold_activation_statistics(self) -> None:
        scaler = self.activation_scaler
        if scaler.scaling_factor is not None:
            self.sae.fold_activation_norm_scaling_factor(scaler.scaling_factor)
            scaler.scaling_factor = None
        if scaler.whitening is not None:
            self.sae.fold_activation_whitening(
                mean=scaler.whitening.mean,
                whitening_matrix=scaler.whitening.matrix,
                unwhitening_matrix=scaler.whitening.inverse_matrix,
            )
            scaler.whitening = None

    def _log(self, log_dict: dict[str, Any]) -> None:
        if log_dict and self.cfg.logger.log_to_wandb and self.is_main:
            wandb.log(log_dict, step=self.n_training_steps)

    @torch.no_grad()
    def _check_replicas(self) -> None:
        every = self.check_replicas_every
        if not every or self.n_training_steps % every != 0:
            return
        spread = 0.0  # the largest difference of any entry between ranks
        for tensor in [*self.sae.parameters(), *self.sae.buffers()]:
            finite = torch.nan_to_num(tensor.detach().double(), posinf=0.0, neginf=0.0)
            high = self.comm.all_reduce(finite.clone(), "max", "checks")
            low = self.comm.all_reduce(finite.clone(), "min", "checks")
            spread = max(spread, float((high - low).max()) if tensor.numel() else 0.0)
        if spread != 0:
            raise RuntimeError(
                f"SAE replicas differ between ranks after step "
                f"{self.n_training_steps} (max difference {spread:.3g})"
            )

    @override
    def step(self, batch: torch.Tensor) -> TrainStepOutput:
        if batch.shape[0] != self.local_batch_size:
            raise ValueError(
                f"rank {self.comm.rank}'s data provider gave {batch.shape[0]} rows; "
                f"each of the {self.comm.world_size} ranks must give "
                f"train_batch_size_samples // world_size = {self.local_batch_size}"
            )
        batch = batch.to(self.sae.device)
        self.n_training_samples += self.cfg.train_batch_size_samples
        return self._train_step(sae=self.sae, sae_in=self.activation_scaler(batch))

    @override
    def _train_step(
        self, sae: TrainingSAE[Any], sae_in: torch.Tensor
    ) -> TrainStepOutput:
        sae.train()
        if getattr(sae.cfg, "check_finite_inputs", False):
            self._check_finite_everywhere(sae_in)
        step = DataParallelStep(
            self.comm, [self.local_batch_size] * self.comm.world_size, self.oversample
        )
        with self.autocast_if_enabled, data_parallel_step(sae, step):
            output = sae.training_forward_pass(
                step_input=TrainStepInput(
                    sae_in=sae_in,
                    dead_neuron_mask=self.dead_neurons,
                    coefficients=self.get_coefficients(),
                    n_training_steps=self.n_training_steps,
                    is_logging_step=self._is_logging_step(),
                ),
            )
        self._update_firing_statistics(output.feature_acts, step)
        output.loss.backward()
        params = list(sae.parameters())
        average_gradients(params, self.comm)
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # SAELens's fixed clip
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.lr_scheduler.step()
        for scheduler in self.coefficient_schedulers.values():
            scheduler.step()
        return output

    def _check_finite_everywhere(self, sae_in: torch.Tensor) -> None:
        # One rank raising alone would leave the others waiting in a collective.
        bad = (~torch.isfinite(sae_in)).any().to(torch.int32).reshape(1)
        flags = self.comm.all_gather(bad, "checks").flatten().tolist()
        if any(flags):
            ranks = [rank for rank, flag in enumerate(flags) if flag]
            raise ValueError(
                f"training batch contains non-finite activations on rank(s) {ranks}; "
                "nothing was updated"
            )

    @torch.no_grad()
    def _update_firing_statistics(
        self, feature_acts: torch.Tensor, step: DataParallelStep
    ) -> None:
        fired = (feature_acts != 0).sum(dim=-2)
        if fired.is_sparse:
            fired = fired.to_dense()
        fired = step.sum_counts(fired)
        self.n_forward_passes_since_fired += 1
        self.n_forward_passes_since_fired[fired > 0] = 0
        self.act_freq_scores += fired.to(self.act_freq_scores.dtype)
        self.n_frac_active_samples += self.cfg.train_batch_size_samples

    @override
    @torch.no_grad()
    def _log_train_step(self, step_output: TrainStepOutput) -> None:
        if self._is_logging_step():  # same answer on every rank
            log_dict = self.build_train_step_log_dict(
                output=step_output, n_training_samples=self.n_training_samples
            )
            self._log(log_dict)

    @override
    @torch.no_grad()
    def build_train_step_log_dict(
        self, output: TrainStepOutput, n_training_samples: int
    ) -> dict[str, Any]:
        """SAELens's training log, with batch metrics over the global batch.
        Collective: every rank must call it."""
        # Architecture metrics read the SAE's state, the same on every rank: rank
        # 0's are logged. The batch metrics are replaced by the global batch's.
        log_dict = super().build_train_step_log_dict(output, n_training_samples)
        if self.comm.active:
            log_dict.update(global_batch_metrics(output, self.comm))
        return log_dict

    @override
    @torch.no_grad()
    def _run_and_log_evals(self) -> None:
        # Rank 0 alone: encode in eval mode runs no collective (the data-parallel
        # step is only set inside training_forward_pass).
        if self.is_main:
            super()._run_and_log_evals()  # type: ignore[no-untyped-call]  # SAELens: unannotated

    @override
    def save_checkpoint(
        self,
        checkpoint_name: str,
        base_path: Path | str | None = None,
        wandb_aliases: list[str] | None = None,
    ) -> None:
        """Rank 0 writes the SAE and trainer state; every rank calls the callback."""
        if self.is_main:
            super().save_checkpoint(checkpoint_name, base_path, wandb_aliases)
        elif self.save_checkpoint_fn is not None:
            base = base_path if base_path is not None else self.cfg.checkpoint_path
            path = None if base is None else Path(base) / checkpoint_name
            if path is not None:
                path.mkdir(parents=True, exist_ok=True)
            self.save_checkpoint_fn(checkpoint_path=path)
        self.comm.barrier()


@torch.no_grad()
def global_batch_metrics(output: TrainStepOutput, comm: Comm) -> dict[str, float]:
    """Loss, explained variance and L0 of the global batch (two small all-reduces).
    With equal shards the mean of the ranks' loss means is the global mean; explained
    variance is measured against the global mean input (hence the second round)."""
    names = list(output.losses)
    sae_in = output.sae_in.double()
    errors = (output.sae_out.double() - sae_in).pow(2).sum(dim=-1)
    losses = [float(output.loss)] + [float(output.losses[n]) for n in names]
    scalars = torch.tensor([*losses, float(sae_in.shape[0])], dtype=torch.float64)
    active = (output.feature_acts != 0).sum().double()
    first = torch.cat(
        [
            scalars.to(sae_in.device),
            torch.stack([errors.sum(), active]),
            sae_in.sum(dim=0),
        ]
    )
    comm.all_reduce(first, "sum", "logging")
    n_losses = 1 + len(names)
    losses = (first[:n_losses] / comm.world_size).tolist()
    total_tokens, error_sum, nonzero = first[n_losses : n_losses + 3].tolist()
    mean_in = first[n_losses + 3 :] / total_tokens
    variance = (sae_in - mean_in).pow(2).sum(dim=-1)
    ratio = 1 - errors / variance
    second = torch.stack([variance.sum(), ratio.sum(), ratio.pow(2).sum()])
    comm.all_reduce(second, "sum", "logging")
    variance_sum, ratio_sum, ratio_sq_sum = second.tolist()
    ratio_mean = ratio_sum / total_tokens
    ratio_var = (ratio_sq_sum - total_tokens * ratio_mean**2) / max(total_tokens - 1, 1)
    metrics = {
        "losses/overall_loss": losses[0],
        "metrics/explained_variance": 1 - error_sum / variance_sum,
        "metrics/explained_variance_legacy": ratio_mean,
        "metrics/explained_variance_legacy_std": max(ratio_var, 0.0) ** 0.5,
        "metrics/l0": nonzero / total_tokens,
    }
    for name, value in zip(names, losses[1:], strict=True):
        metrics[f"losses/{name}"] = value
    return metrics
