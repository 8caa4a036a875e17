"""The plugin architectures through SAELens's own entry points, offline.

Covered here: the stock training CLI's parser (``_parse_cfg_args``) and its runner,
``HookedSAETransformer.run_with_cache_with_saes``, ``evals.run_evals``,
``SyntheticSAERunner``, ``MultiSAETrainingRunner`` and ``SAE.from_pretrained`` with
a ``converter``. Loading in a fresh interpreter that never imports the plugin and the
stock ``python -m sae_lens.llm_sae_training_runner`` are in test_autoload.py.
"""

from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import (
    SAE,
    HookedSAETransformer,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
)
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.llm_sae_training_runner import _parse_cfg_args
from sae_lens.loading.pretrained_sae_loaders import sae_lens_disk_loader
from sae_lens.multi_sae_training_runner import (
    MultiSAETrainingRunner,
    MultiSAETrainingRunnerConfig,
)
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY, get_sae_class
from sae_lens.synthetic import SyntheticModelConfig
from sae_lens.synthetic.synthetic_sae_runner import (
    SyntheticSAERunner,
    SyntheticSAERunnerConfig,
)
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.activations_store import ActivationsStore

from tests.helpers import (
    CONTEXT,
    D_MODEL,
    HOOK,
    runner_config,
    tiny_model,
    token_dataset,
)

ARCHITECTURES = [
    arch
    for arch in ("sampled", "mutual_choice", "feature_choice")
    if arch in SAE_TRAINING_CLASS_REGISTRY
]
D_SAE = 128
K = 4
STEPS = 30
BATCH_TOKENS = 128

# Fields each architecture adds to the CLI (besides -k and the shared ones).
CLI_FLAGS = {
    "sampled": [
        "--pool_factor [float]",
        "--pool_fraction [float]",
        "--score {",
        "--pool_mode {",
        "--pool_seed",
    ],
    "mutual_choice": [
        "--threshold_mode {rate,per_feature,global}",
        "--threshold_gain float",
    ],
    "feature_choice": ["--capacity_schedule {", "--rerank_every int", "--rank_by {"],
}


def training_config(arch: str, d_in: int = D_MODEL, **fields: Any) -> Any:
    cfg_cls = SAE_TRAINING_CLASS_REGISTRY[arch][1]
    return cfg_cls(d_in=d_in, d_sae=D_SAE, k=K, **fields)


def inference_class(arch: str) -> type:
    return get_sae_class(arch)[0]


def training_class(arch: str) -> type:
    return SAE_TRAINING_CLASS_REGISTRY[arch][0]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def dataset():
    return token_dataset()


@pytest.fixture(scope="module")
def trained(model, dataset, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Each architecture trained once by LanguageModelSAETrainingRunner."""
    torch.set_grad_enabled(True)
    runs = {}
    for arch in ARCHITECTURES:
        torch.manual_seed(0)
        root = tmp_path_factory.mktemp(arch)
        cfg = runner_config(
            training_config(arch), root, steps=STEPS, batch_tokens=BATCH_TOKENS
        )
        runner = LanguageModelSAETrainingRunner(
            cfg, override_model=model, override_dataset=dataset
        )
        sae = runner.run()
        runs[arch] = {"cfg": cfg, "sae": sae, "final": root / "final"}
    return runs


def fresh_store(model, dataset, cfg) -> ActivationsStore:
    """A new store over the same data: the same token stream from the start."""
    return ActivationsStore.from_config(model, cfg, override_dataset=dataset)


# ---------------------------------------------------------------------------
# The stock training CLI (llm_sae_training_runner._parse_cfg_args + runner)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cli_help_lists_plugin_fields(arch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse_cfg_args(["--architecture", arch, "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ["-k float", "--aux_loss {aux_k,aux_zipf,none}", *CLI_FLAGS[arch]]:
        assert flag in help_text, flag


CLI_SAE_ARGS = {
    "sampled": ["--pool_factor", "2.5", "--score", "entropy", "--pool_seed", "3"],
    "mutual_choice": ["--threshold_mode", "per_feature"],
    "feature_choice": ["--capacity_schedule", "uniform", "--rerank_every", "7"],
}
CLI_SAE_VALUES = {
    "sampled": {"pool_factor": 2.5, "score": "entropy", "pool_seed": 3},
    "mutual_choice": {"threshold_mode": "per_feature"},
    "feature_choice": {"capacity_schedule": "uniform", "rerank_every": 7},
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cli_config_trains_offline(arch, model, dataset, tmp_path):
    # The CLI has no override_model/override_dataset flags: parse with the CLI's own
    # parser, then hand the config to the runner with the offline model and data.
    argv = [
        "--architecture", arch,
        "--d_in", str(D_MODEL), "--d_sae", "64", "-k", "3",
        "--aux_loss", "none",
        *CLI_SAE_ARGS[arch],
        "--hook_name", HOOK, "--dataset_path", "", "--streaming", "False",
        "--context_size", str(CONTEXT), "--prepend_bos", "False",
        "--training_tokens", str(10 * BATCH_TOKENS),
        "--train_batch_size_tokens", str(BATCH_TOKENS),
        "--store_batch_size_prompts", "8", "--n_batches_in_buffer", "16",
        "--log_to_wandb", "False", "--device", "cpu", "--n_checkpoints", "0",
        "--checkpoint_path", str(tmp_path / "checkpoints"),
        "--output_path", str(tmp_path / "final"),
        "--exclude_special_tokens", "False",
    ]  # fmt: skip
    cfg = _parse_cfg_args(argv)
    assert type(cfg.sae) is SAE_TRAINING_CLASS_REGISTRY[arch][1]
    assert (cfg.sae.d_in, cfg.sae.d_sae, cfg.sae.k, cfg.sae.aux_loss) == (
        D_MODEL,
        64,
        3.0,
        "none",
    )
    for name, value in CLI_SAE_VALUES[arch].items():
        assert getattr(cfg.sae, name) == value, name
    sae = LanguageModelSAETrainingRunner(
        cfg, override_model=model, override_dataset=dataset
    ).run()
    assert type(sae) is training_class(arch)
    assert sae.n_tokens_seen.item() == 10 * BATCH_TOKENS
    loaded = SAE.load_from_disk(tmp_path / "final")
    assert type(loaded) is inference_class(arch)
    for name, value in CLI_SAE_VALUES[arch].items():
        if hasattr(loaded.cfg, name):
            assert getattr(loaded.cfg, name) == value, name


# ---------------------------------------------------------------------------
# HookedSAETransformer
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hooked_sae_transformer_runs_inference_sae(arch, trained, model):
    sae = SAE.load_from_disk(trained[arch]["final"])
    assert sae.cfg.metadata.hook_name == HOOK
    hooked = HookedSAETransformer(model.cfg)
    hooked.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (3, CONTEXT), generator=generator)

    _, clean_cache = hooked.run_with_cache(tokens)
    _, cache = hooked.run_with_cache_with_saes(tokens, saes=[sae])
    acts = cache[f"{HOOK}.hook_sae_acts_post"]
    assert acts.shape == (3, CONTEXT, D_SAE)
    assert cache[f"{HOOK}.hook_sae_acts_pre"].shape == (3, CONTEXT, D_SAE)
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_input"], clean_cache[HOOK])
    expected = sae.encode(clean_cache[HOOK])
    torch.testing.assert_close(acts, expected)
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_recons"], sae.decode(expected))
    # per-token inference: a sequence's codes do not depend on the rest of the batch
    _, alone = hooked.run_with_cache_with_saes(tokens[1:2], saes=[sae])
    torch.testing.assert_close(alone[f"{HOOK}.hook_sae_acts_post"], acts[1:2])
    assert 0 < (acts > 0).sum(-1).float().mean() < D_SAE
    assert not hooked.acts_to_saes  # removed after the run


# ---------------------------------------------------------------------------
# evals.run_evals
# ---------------------------------------------------------------------------

EVAL_CONFIG = EvalConfig(
    batch_size_prompts=4,
    n_eval_reconstruction_batches=2,
    compute_kl=True,
    compute_ce_loss=True,
    n_eval_sparsity_variance_batches=2,
    compute_l2_norms=True,
    compute_sparsity_metrics=True,
    compute_variance_metrics=True,
)


def evaluate(sae, model, dataset, cfg) -> dict[str, Any]:
    metrics, _ = run_evals(
        sae,
        fresh_store(model, dataset, cfg),
        model,
        ActivationScaler(),
        EVAL_CONFIG,
        exclude_special_tokens=False,
    )
    return metrics


def manual_l0(sae, model, dataset, cfg) -> float:
    """L0 per token over what run_evals' sparsity pass reads (same fresh stream)."""
    store = fresh_store(model, dataset, cfg)
    # run_evals reads the CE/KL batches first, then the sparsity batches
    for _ in range(EVAL_CONFIG.n_eval_reconstruction_batches):
        store.get_batch_tokens(EVAL_CONFIG.batch_size_prompts)
    counts = []
    for _ in range(EVAL_CONFIG.n_eval_sparsity_variance_batches):
        tokens = store.get_batch_tokens(EVAL_CONFIG.batch_size_prompts)
        _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
        counts.append((sae.encode(cache[HOOK]) != 0).sum(-1).flatten().float())
    return torch.cat(counts).mean().item()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_run_evals_on_trained_and_loaded_sae(arch, trained, model, dataset):
    run = trained[arch]
    training_sae = run["sae"].eval()  # evals use the training SAE in eval mode
    inference_sae = SAE.load_from_disk(run["final"])
    with torch.no_grad():
        from_training = evaluate(training_sae, model, dataset, run["cfg"])
        from_inference = evaluate(inference_sae, model, dataset, run["cfg"])
        expected_l0 = manual_l0(inference_sae, model, dataset, run["cfg"])
    training_sae.train()

    for metrics in (from_training, from_inference):
        sparsity = metrics["sparsity"]
        quality = metrics["reconstruction_quality"]
        assert sparsity["l0"] == pytest.approx(expected_l0, rel=1e-6)
        assert 0 < sparsity["l0"] < D_SAE
        assert sparsity["l1"] > 0
        assert quality["explained_variance"] <= 1
        assert quality["mse"] >= 0
        assert -1 <= quality["cossim"] <= 1
        assert metrics["shrinkage"]["l2_norm_out"] >= 0
        kl = metrics["model_behavior_preservation"]
        assert kl["kl_div_with_sae"] >= 0 and kl["kl_div_with_ablation"] >= 0
        ce = metrics["model_performance_preservation"]
        assert torch.isfinite(torch.tensor(ce["ce_loss_score"]))
    # The training SAE in eval mode applies the thresholds the saved SAE applies.
    assert from_training["sparsity"]["l0"] == pytest.approx(
        from_inference["sparsity"]["l0"], rel=1e-6
    )
    assert from_training["reconstruction_quality"]["mse"] == pytest.approx(
        from_inference["reconstruction_quality"]["mse"], rel=1e-4
    )


# ---------------------------------------------------------------------------
# SAE.from_pretrained with a converter
# ---------------------------------------------------------------------------


def local_converter(
    repo_id: str,
    folder_name: str,
    device: str,
    force_download: bool,
    cfg_overrides: dict[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor | None]:
    """A from_pretrained converter that reads a local SAELens folder (``sae_id``)."""
    cfg_dict, state_dict = sae_lens_disk_loader(folder_name, device, cfg_overrides)
    return cfg_dict, state_dict, None


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_from_pretrained_with_local_converter(arch, trained):
    # A release not in pretrained_saes.yaml must look like a hub repo id ("a/b");
    # the converter decides where the files come from.
    final = trained[arch]["final"]
    sae, cfg_dict, sparsity = SAE.from_pretrained_with_cfg_and_sparsity(
        "local/plugin", str(final), converter=local_converter
    )
    reference = SAE.load_from_disk(final)
    assert type(sae) is inference_class(arch)
    assert cfg_dict["architecture"] == arch
    assert sparsity is None
    assert sae.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(sae.state_dict()[name], tensor), name
    folded = SAE.from_pretrained(
        "local/plugin", str(final), converter=local_converter, fold_W_dec_norm=True
    )
    x = torch.randn(4, D_MODEL)
    torch.testing.assert_close(
        folded.decode(folded.encode(x)), reference.decode(reference.encode(x))
    )


# ---------------------------------------------------------------------------
# SyntheticSAERunner
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_synthetic_runner(arch, tmp_path):
    torch.manual_seed(0)
    hidden = 16
    cfg = SyntheticSAERunnerConfig(
        synthetic_model=SyntheticModelConfig(
            num_features=48, hidden_dim=hidden, seed=0
        ),
        sae=training_config(arch, d_in=hidden),
        training_samples=STEPS * BATCH_TOKENS,
        batch_size=BATCH_TOKENS,
        lr=3e-3,
        dead_feature_window=10,
        feature_sampling_window=20,
        checkpoint_path=None,
        output_path=str(tmp_path / "out"),
        eval_samples=1024,
        logger=LoggingConfig(log_to_wandb=False),
    )
    # the runner's config survives its own dict round trip (registry dispatch)
    restored = SyntheticSAERunnerConfig.from_dict(cfg.to_dict())
    assert restored.sae == cfg.sae

    result = SyntheticSAERunner(cfg).run()
    assert type(result.sae) is training_class(arch)
    assert result.sae.n_tokens_seen.item() == STEPS * BATCH_TOKENS
    evaluation = result.final_eval
    assert 0 < evaluation.sae_l0 < D_SAE
    assert 0 <= evaluation.dead_latents <= D_SAE
    assert 0 <= evaluation.mcc <= 1
    assert evaluation.explained_variance <= 1
    loaded = SAE.load_from_disk(tmp_path / "out")
    assert type(loaded) is inference_class(arch)
    x = torch.randn(8, hidden)
    result.sae.eval()
    torch.testing.assert_close(loaded.encode(x), result.sae.encode(x))


# ---------------------------------------------------------------------------
# MultiSAETrainingRunner: all plugin architectures on one forward pass
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def multi_run(model, dataset, tmp_path_factory) -> tuple[dict[str, Any], Path]:
    torch.set_grad_enabled(True)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("multi") / "out"
    cfg = MultiSAETrainingRunnerConfig(
        saes={arch: training_config(arch) for arch in ARCHITECTURES},
        hook_names=HOOK,
        dataset_path="",
        streaming=False,
        context_size=CONTEXT,
        n_batches_in_buffer=16,
        training_tokens=STEPS * BATCH_TOKENS,
        store_batch_size_prompts=8,
        train_batch_size_tokens=BATCH_TOKENS,
        prepend_bos=False,
        lr=3e-3,
        dead_feature_window=10,
        feature_sampling_window=20,
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=None,
        output_path=str(out),
        exclude_special_tokens=False,
    )
    assert all(arch in cfg.logger.run_name for arch in ARCHITECTURES)
    saes = MultiSAETrainingRunner(
        cfg, override_dataset=dataset, override_model=model
    ).run()
    return saes, out


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_multi_sae_runner(arch, multi_run):
    saes, out = multi_run
    sae = saes[arch]
    assert type(sae) is training_class(arch)
    assert sae.n_tokens_seen.item() == STEPS * BATCH_TOKENS
    assert sae.cfg.metadata.hook_name == HOOK
    loaded = SAE.load_from_disk(out / arch)
    assert type(loaded) is inference_class(arch)
    x = torch.randn(2, 5, D_MODEL)
    sae.eval()
    try:
        torch.testing.assert_close(loaded.encode(x), sae.encode(x))
    finally:
        sae.train()
