"""Language-model data source of ``compare``: SAELens's LM runner and ``run_evals``.

Each run trains through ``LanguageModelSAETrainingRunner`` on the model's activations
at ``hook`` (the model is loaded once and handed to every runner); evaluation is
``sae_lens.evals.run_evals`` over ``eval_samples`` tokens read from the start of the
dataset, the same tokens for every pass.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from sae_lens.saes.sae import TrainingSAEConfig

from sae_lens_sampled.benchmark.config import DEFAULT_EVAL_SAMPLES, CompareConfig
from sae_lens_sampled.benchmark.metrics import finite
from sae_lens_sampled.benchmark.runs import quiet_sae_lens
from sae_lens_sampled.benchmark.source import DataSource, training_schedule


@torch.no_grad()
def hook_width(model: Any, hook: str) -> int:
    device = next(model.parameters()).device
    tokens = torch.zeros((1, 2), dtype=torch.long, device=device)
    _, cache = model.run_with_cache(tokens, names_filter=[hook])
    return math.prod(cache[hook].shape[2:])


class LanguageModelSource(DataSource):
    """A language model's activations at one hook, streamed from a dataset."""

    mode = "language_model"

    def __init__(self, cfg: CompareConfig, model: Any | None, dataset: Any | None):
        if cfg.hook is None:
            raise ValueError("hook must be set in language-model mode, got None")
        self.cfg = cfg
        self.hook: str = cfg.hook
        if model is None:
            from sae_lens.load_model import load_model

            assert cfg.model is not None
            # Loaded once and handed to every runner.
            model = load_model(
                cfg.model_class_name,
                cfg.model,
                device=cfg.device,
                hook_names=[cfg.hook],
            )
        self.model = model
        self.dataset = dataset
        self.d_in = hook_width(model, self.hook)
        self.eval_samples = cfg.eval_samples or DEFAULT_EVAL_SAMPLES
        self._runner: Any = None

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.cfg.model or "override_model",
            "hook": self.hook,
            "dataset": self.cfg.dataset if self.dataset is None else "override_dataset",
            "d_in": self.d_in,
            "eval_samples": self.eval_samples,
        }

    def _runner_config(self, sae_cfg: TrainingSAEConfig, seed: int) -> Any:
        from sae_lens import LanguageModelSAERunnerConfig

        cfg = self.cfg
        has_tokenizer = getattr(self.model, "tokenizer", None) is not None
        n_ctx = getattr(getattr(self.model, "cfg", None), "n_ctx", 128)
        context = cfg.context_size or min(128, n_ctx)
        settings: dict[str, Any] = {
            "sae": sae_cfg,
            "model_name": cfg.model or "override_model",
            "model_class_name": cfg.model_class_name,
            "hook_name": self.hook,
            "dataset_path": cfg.dataset if self.dataset is None else "",
            "streaming": self.dataset is None,
            "is_dataset_tokenized": self.dataset is not None,
            "context_size": context,
            "prepend_bos": has_tokenizer,
            "training_tokens": cfg.steps * cfg.batch_size,
            "train_batch_size_tokens": cfg.batch_size,
            "store_batch_size_prompts": 16,
            # The store's buffer must hold at least one training batch.
            "n_batches_in_buffer": max(20, 2 * math.ceil(cfg.batch_size / context)),
            "seed": seed,
            "n_checkpoints": 0,
            "checkpoint_path": None,
            "output_path": None,
            "verbose": False,
            **training_schedule(cfg),
            **cfg.lm_settings,
        }
        return LanguageModelSAERunnerConfig(**settings)

    def train(self, sae_cfg: TrainingSAEConfig, seed: int) -> Any:
        from sae_lens import LanguageModelSAETrainingRunner

        runner_cfg = self._runner_config(sae_cfg, seed)
        with quiet_sae_lens():
            self._runner = LanguageModelSAETrainingRunner(
                runner_cfg, override_model=self.model, override_dataset=self.dataset
            )
            return self._runner.run()

    def evaluate(self, sae: Any) -> dict[str, Any]:
        from sae_lens.evals import EvalConfig, run_evals
        from sae_lens.training.activation_scaler import ActivationScaler

        store = self._runner.activations_store
        prompts = store.store_batch_size_prompts
        n_batches = max(
            1, math.ceil(self.eval_samples / (prompts * store.context_size))
        )
        eval_cfg = EvalConfig(
            batch_size_prompts=prompts,
            n_eval_reconstruction_batches=n_batches,
            n_eval_sparsity_variance_batches=n_batches,
            compute_ce_loss=True,
            compute_sparsity_metrics=True,
            compute_variance_metrics=True,
            compute_featurewise_density_statistics=True,
        )
        # Every pass reads the same tokens.
        store.reset_input_dataset()
        metrics, feature_metrics = run_evals(
            sae,
            store,
            self.model,
            ActivationScaler(),
            eval_cfg,
            exclude_special_tokens=getattr(self.model, "tokenizer", None) is not None,
        )
        density = torch.tensor(feature_metrics["feature_density"])
        return {
            "l0": metrics["sparsity"]["l0"],
            "explained_variance": finite(
                metrics["reconstruction_quality"]["explained_variance"]
            ),
            "dead_features": int((density == 0).sum()),
            "ce_loss_score": finite(
                metrics["model_performance_preservation"]["ce_loss_score"]
            ),
        }
