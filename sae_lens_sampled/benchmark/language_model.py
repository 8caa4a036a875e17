"""Language-model mode of ``compare``: SAELens's LM runner and ``run_evals``.

Each run trains through ``LanguageModelSAETrainingRunner`` on the model's activations
at ``hook`` (the model is loaded once and handed to every runner); evaluation is
``sae_lens.evals.run_evals`` on the exported inference SAE (per token) and on the
training SAE's batch rule, over the same tokens.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from sae_lens import LoggingConfig

from sae_lens_sampled.benchmark.runs import (
    base_result,
    batch_rule_view,
    finite,
    quiet_sae_lens,
    run_dir_name,
    to_inference_sae,
)
from sae_lens_sampled.benchmark.specs import RunSpec, build_sae_config

if TYPE_CHECKING:
    from sae_lens_sampled.benchmark.compare import CompareConfig


def compare_lm(
    cfg: CompareConfig,
    runs: list[RunSpec],
    output: Path | None,
    model: Any | None,
    dataset: Any | None,
) -> list[dict[str, Any]]:
    assert cfg.hook is not None
    if model is None:
        from sae_lens.load_model import load_model

        assert cfg.model is not None
        # Loaded once and handed to every runner.
        model = load_model(
            cfg.model_class_name, cfg.model, device=cfg.device, hook_names=[cfg.hook]
        )
    d_in = _hook_width(model, cfg.hook)
    results = []
    for index, spec in enumerate(runs, start=1):
        print(f"[{index}/{len(runs)}] {spec.label}", flush=True)
        run_dir = output / "saes" / run_dir_name(index, spec) if output else None
        results.append(_lm_run(cfg, spec, model, dataset, d_in, run_dir))
    return results


@torch.no_grad()
def _hook_width(model: Any, hook: str) -> int:
    device = next(model.parameters()).device
    tokens = torch.zeros((1, 2), dtype=torch.long, device=device)
    _, cache = model.run_with_cache(tokens, names_filter=[hook])
    return math.prod(cache[hook].shape[2:])


def _lm_runner_config(
    cfg: CompareConfig, sae_cfg: Any, model: Any, dataset: Any, run_dir: Path | None
) -> Any:
    from sae_lens import LanguageModelSAERunnerConfig

    has_tokenizer = getattr(model, "tokenizer", None) is not None
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", 128)
    context = cfg.context_size or min(128, n_ctx)
    settings: dict[str, Any] = {
        "sae": sae_cfg,
        "model_name": cfg.model or "override_model",
        "model_class_name": cfg.model_class_name,
        "hook_name": cfg.hook,
        "dataset_path": cfg.dataset if dataset is None else "",
        "streaming": dataset is None,
        "is_dataset_tokenized": dataset is not None,
        "context_size": context,
        "prepend_bos": has_tokenizer,
        "training_tokens": cfg.steps * cfg.batch_size,
        "train_batch_size_tokens": cfg.batch_size,
        "store_batch_size_prompts": 16,
        # The store's buffer must hold at least one training batch.
        "n_batches_in_buffer": max(20, 2 * math.ceil(cfg.batch_size / context)),
        "lr": cfg.lr,
        "lr_decay_steps": cfg.steps // 5,
        "dead_feature_window": cfg.dead_feature_window,
        "feature_sampling_window": 2 * cfg.dead_feature_window,
        "device": cfg.device,
        "seed": cfg.seed,
        "logger": LoggingConfig(log_to_wandb=False),
        "n_checkpoints": 0,
        "checkpoint_path": None,
        "output_path": str(run_dir) if run_dir is not None else None,
        "verbose": False,
    }
    settings.update(cfg.lm_settings)
    return LanguageModelSAERunnerConfig(**settings)


def _lm_run(
    cfg: CompareConfig,
    spec: RunSpec,
    model: Any,
    dataset: Any,
    d_in: int,
    run_dir: Path | None,
) -> dict[str, Any]:
    from sae_lens import LanguageModelSAETrainingRunner

    sae_cfg = build_sae_config(spec, d_in=d_in, d_sae=cfg.d_sae, k=cfg.k)
    runner_cfg = _lm_runner_config(cfg, sae_cfg, model, dataset, run_dir)
    torch.manual_seed(cfg.seed)
    with quiet_sae_lens():
        runner = LanguageModelSAETrainingRunner(
            runner_cfg, override_model=model, override_dataset=dataset
        )
        start = time.perf_counter()
        sae = runner.run()
        seconds = time.perf_counter() - start

    result = base_result(spec, sae, runner_cfg.training_tokens, seconds)
    exclude: bool = getattr(model, "tokenizer", None) is not None
    inference = to_inference_sae(sae)
    result.update(_lm_eval(cfg, runner, model, inference, exclude, ""))
    view = batch_rule_view(sae)
    result.update(_lm_eval(cfg, runner, model, view, exclude, "_batch"))
    result.update(mcc=None, uniqueness=None, precision=None, recall=None, true_l0=None)
    return result


def _lm_eval(
    cfg: CompareConfig,
    runner: Any,
    model: Any,
    sae: Any | None,
    exclude_special_tokens: bool,
    suffix: str,
) -> dict[str, Any]:
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    names = ("l0", "explained_variance", "dead_features", "ce_loss_score")
    if sae is None:
        return {name + suffix: None for name in names}
    store = runner.activations_store
    prompts = store.store_batch_size_prompts
    n_batches = max(1, math.ceil(cfg.eval_samples / (prompts * store.context_size)))
    eval_cfg = EvalConfig(
        batch_size_prompts=prompts,
        n_eval_reconstruction_batches=n_batches,
        n_eval_sparsity_variance_batches=n_batches,
        compute_ce_loss=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
    )
    # Both passes read the same tokens.
    store.reset_input_dataset()
    metrics, feature_metrics = run_evals(
        sae,
        store,
        model,
        ActivationScaler(),
        eval_cfg,
        exclude_special_tokens=exclude_special_tokens,
    )
    density = torch.tensor(feature_metrics["feature_density"])
    return {
        "l0" + suffix: metrics["sparsity"]["l0"],
        "explained_variance" + suffix: finite(
            metrics["reconstruction_quality"]["explained_variance"]
        ),
        "dead_features" + suffix: int((density == 0).sum()),
        "ce_loss_score" + suffix: finite(
            metrics["model_performance_preservation"]["ce_loss_score"]
        ),
    }
