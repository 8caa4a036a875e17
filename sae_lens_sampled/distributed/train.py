"""``torchrun --nproc_per_node N -m sae_lens_sampled train ...``: SAELens's training CLI,
data-parallel (``docs/distributed.md``, "What to run").

Each rank streams its own shard of the dataset to :class:`DistributedSAETrainer`;
rank 0 alone logs, evaluates and writes the SAE.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import wandb
from sae_lens import logger
from sae_lens.config import LanguageModelSAERunnerConfig
from sae_lens.constants import ACTIVATIONS_STORE_STATE_FILENAME, RUNNER_CFG_FILENAME
from sae_lens.llm_sae_training_runner import (
    LanguageModelSAETrainingRunner,
    LLMSaeEvaluator,
    _parse_cfg_args,
)
from sae_lens.load_model import load_model
from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.training.prefetch import PrefetchingIterator
from sae_lens.training.types import DataProvider
from typing_extensions import override

from sae_lens_sampled.distributed.comm import Comm
from sae_lens_sampled.distributed.same_config import (
    check_same_settings,
    describe_settings,
)
from sae_lens_sampled.distributed.trainer import DistributedSAETrainer

DATA_PARALLEL_FILENAME = "data_parallel.json"


def store_state_filename(rank: int) -> str:
    """Rank 0 uses SAELens's file name, so its checkpoint reads like a normal one."""
    if rank == 0:
        return ACTIVATIONS_STORE_STATE_FILENAME
    stem, suffix = ACTIVATIONS_STORE_STATE_FILENAME.rsplit(".", 1)
    return f"{stem}_rank{rank}.{suffix}"


def shard_dataset(dataset: Any, rank: int, world_size: int) -> Any:
    """Rank ``rank``'s disjoint share of a Hugging Face dataset."""
    from datasets.distributed import split_dataset_by_node

    return split_dataset_by_node(dataset, rank=rank, world_size=world_size)


def place_on_local_device(cfg: LanguageModelSAERunnerConfig[Any]) -> None:
    """Put every CUDA device of ``cfg`` on this rank's GPU (``LOCAL_RANK``)."""
    if torch.device(cfg.device).type != "cuda":
        return
    local_rank = int(
        os.environ.get("LOCAL_RANK", dist.get_rank() if dist.is_initialized() else 0)
    )
    torch.cuda.set_device(local_rank)
    for name in ("device", "llm_device", "act_store_device"):
        device = getattr(cfg, name)
        if device is not None and torch.device(device).type == "cuda":
            setattr(cfg, name, f"cuda:{local_rank}")


class DistributedLanguageModelRunner(LanguageModelSAETrainingRunner):
    """SAELens's ``LanguageModelSAETrainingRunner`` with one dataset shard per rank.

    ``cfg`` describes the global run; the process group must be initialised. Like
    SAELens's runner it takes ``override_dataset`` (sharded here), ``override_model``
    and ``override_sae``.
    """

    def __init__(
        self,
        cfg: LanguageModelSAERunnerConfig[Any],
        override_dataset: Any = None,
        override_model: Any = None,
        override_sae: TrainingSAE[Any] | None = None,
        comm: Comm | None = None,
    ) -> None:
        self.comm = Comm() if comm is None else comm
        rank, world = self.comm.rank, self.comm.world_size
        place_on_local_device(cfg)  # first: NCCL collectives need the rank's GPU
        # Each rank's config drew its own random checkpoint suffix: use rank 0's.
        cfg.checkpoint_path = self.comm.broadcast_object(cfg.checkpoint_path)
        # Before any other check: ranks started with other flags fail here, alike.
        check_same_settings(self.comm, describe_settings(cfg.to_dict()), "config")
        if cfg.train_batch_size_tokens % world != 0:
            raise ValueError(
                f"train_batch_size_tokens={cfg.train_batch_size_tokens} must be a "
                f"multiple of the number of ranks {world}"
            )
        if cfg.use_cached_activations:
            raise NotImplementedError(
                "data-parallel training reads activations from the model; "
                "use_cached_activations is not supported"
            )
        if cfg.compile_sae and world > 1:
            raise NotImplementedError(
                "compile_sae is not supported with several ranks (the selection "
                "runs collectives inside training_forward_pass)"
            )
        self.cfg = cfg
        if override_model is None:
            assert cfg.llm_device is not None
            self.model = load_model(
                cfg.model_class_name,
                cfg.model_name,
                device=cfg.llm_device,
                model_from_pretrained_kwargs=cfg.model_from_pretrained_kwargs,
                hook_names=[cfg.hook_name],
            )
        else:
            self.model = override_model
        self._compile_llm_if_needed()  # type: ignore[no-untyped-call]  # SAELens: unannotated
        dataset = override_dataset
        if dataset is None:
            from datasets import load_dataset

            options: dict[str, Any] = {}
            if cfg.dataset_trust_remote_code:  # recent datasets warn on any value
                options["trust_remote_code"] = True
            dataset = load_dataset(
                cfg.dataset_path, split="train", streaming=cfg.streaming, **options
            )
        # The store sees this rank's rows and batch size; everything else is global.
        local_cfg = copy.copy(cfg)
        local_cfg.train_batch_size_tokens = cfg.train_batch_size_tokens // world
        local_cfg.training_tokens = cfg.training_tokens // world
        self.activations_store = ActivationsStore.from_config(
            self.model, local_cfg, override_dataset=shard_dataset(dataset, rank, world)
        )
        if override_sae is not None:
            self.sae = override_sae
        elif cfg.from_pretrained_path is not None:
            self.sae = TrainingSAE.load_from_disk(cfg.from_pretrained_path, cfg.device)
        else:
            self.sae = TrainingSAE.from_dict(
                TrainingSAEConfig.from_dict(cfg.get_training_sae_cfg_dict()).to_dict()
            )
        self.sae.to(cfg.device)
        self.evaluator = LLMSaeEvaluator(
            model=self.model,
            activations_store=self.activations_store,
            eval_batch_size_prompts=cfg.eval_batch_size_prompts,
            n_eval_batches=cfg.n_eval_batches,
            model_kwargs=cfg.model_kwargs,
        )

    @property
    def is_main(self) -> bool:
        return self.comm.rank == 0

    @override
    def run(self) -> TrainingSAE[Any]:
        self._set_sae_metadata()  # type: ignore[no-untyped-call]  # SAELens: unannotated
        log_to_wandb = self.cfg.logger.log_to_wandb
        if log_to_wandb and self.is_main:
            wandb.init(
                project=self.cfg.logger.wandb_project,
                entity=self.cfg.logger.wandb_entity,
                config=self.cfg.to_dict(),
                name=self.cfg.logger.run_name,
                id=self.cfg.logger.wandb_id,
            )
        data_provider: DataProvider = self.activations_store
        if self.cfg.prefetch_llm_batches:
            prefetch = int(self.cfg.prefetch_llm_batches)  # True: 1
            data_provider = PrefetchingIterator(
                iter(self.activations_store), prefetch=prefetch
            )
        try:
            trainer = DistributedSAETrainer(
                cfg=self.cfg.to_sae_trainer_config(),
                sae=self.sae,
                data_provider=data_provider,
                evaluator=self.evaluator,
                save_checkpoint_fn=self.save_checkpoint,
                group=self.comm.group,
            )
            if self.cfg.resume_from_checkpoint is not None:
                self.resume(trainer, Path(self.cfg.resume_from_checkpoint))
            sae: TrainingSAE[Any] = self.run_trainer_with_interruption_handling(trainer)
            if self.cfg.output_path is not None and self.is_main:
                self.save_final_sae(
                    sae=sae,
                    output_path=self.cfg.output_path,
                    log_feature_sparsity=trainer.log_feature_sparsity,
                )
            self.comm.barrier()
            if log_to_wandb and self.is_main:
                wandb.finish()
            return sae
        finally:
            if isinstance(data_provider, PrefetchingIterator):
                data_provider.close()

    def resume(self, trainer: DistributedSAETrainer, path: Path) -> None:
        """Load the trainer, the SAE and this rank's data-loader state from ``path``."""
        saved_world = 1
        info = path / DATA_PARALLEL_FILENAME
        if info.exists():
            saved_world = json.loads(info.read_text())["world_size"]
        if saved_world != self.comm.world_size:
            raise ValueError(
                f"checkpoint {path} was written by {saved_world} rank(s); resume it "
                f"on the same number of ranks, not {self.comm.world_size} (each rank "
                "restarts its own dataset shard)"
            )
        logger.info(f"Resuming from checkpoint: {path}")
        trainer.load_trainer_state(path)
        self.sae.load_weights_from_checkpoint(path)
        self.activations_store.load(str(path / store_state_filename(self.comm.rank)))

    @override
    def save_checkpoint(self, checkpoint_path: Path | None) -> None:
        """This rank's data-loader state; on rank 0 also the runner config."""
        if checkpoint_path is None:
            return
        checkpoint_path.mkdir(parents=True, exist_ok=True)
        self.activations_store.save(
            str(checkpoint_path / store_state_filename(self.comm.rank))
        )
        if self.is_main:
            with open(checkpoint_path / RUNNER_CFG_FILENAME, "w") as f:
                json.dump(self.cfg.to_dict(), f)
            info = {"world_size": self.comm.world_size}
            (checkpoint_path / DATA_PARALLEL_FILENAME).write_text(json.dumps(info))


@contextmanager
def process_group(device: str) -> Iterator[Comm]:
    """The default process group, initialised from torchrun's environment if needed
    (NCCL for CUDA, gloo otherwise) and destroyed on exit if it was made here."""
    made_here = not dist.is_initialized()
    if made_here:
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    try:
        yield Comm()
    finally:
        if made_here:
            dist.destroy_process_group()


def run_cli(
    argv: Sequence[str], override_model: Any = None, override_dataset: Any = None
) -> TrainingSAE[Any]:
    """Parse SAELens's training flags and train data-parallel over the ranks."""
    from sae_lens_sampled._plugin import register_all

    register_all()  # the architectures, for --architecture
    cfg = _parse_cfg_args(list(argv))
    with process_group(cfg.device) as comm:
        runner = DistributedLanguageModelRunner(
            cfg,
            override_dataset=override_dataset,
            override_model=override_model,
            comm=comm,
        )
        return runner.run()


def main(argv: Sequence[str] | None = None) -> int:
    run_cli(sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
