"""Train a `sampled` SAE offline on a tiny random transformer (no downloads).

A smoke-sized version of the real thing: SAELens's runner, activations store and trainer,
with a random-weight HookedTransformer and an in-memory token dataset. Prints L0 and
explained variance of `sampled`, `mutual_choice` and SAELens `batchtopk` at equal k.

    python examples/train_sampled_tiny_offline.py
"""

import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from sae_lens import (
    BatchTopKTrainingSAEConfig,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
)
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_lens_sampled import MutualChoiceTrainingSAEConfig, SampledTrainingSAEConfig

D_MODEL, CONTEXT, VOCAB, K, D_SAE, STEPS, BATCH = 64, 32, 512, 8, 512, 400, 512


def main() -> None:
    torch.manual_seed(0)
    model = HookedTransformer(
        HookedTransformerConfig(
            n_layers=2, d_model=D_MODEL, n_ctx=CONTEXT, d_head=16, n_heads=4,
            d_mlp=256, d_vocab=VOCAB, act_fn="gelu", normalization_type="LN",
            device="cpu", seed=0,
        )
    )  # fmt: skip
    weights = 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float64)
    tokens = torch.multinomial(weights, 4000 * CONTEXT, replacement=True)
    dataset = Dataset.from_dict({"tokens": tokens.view(-1, CONTEXT).tolist()})
    eval_tokens = torch.multinomial(weights, 64 * CONTEXT, replacement=True)
    eval_tokens = eval_tokens.view(-1, CONTEXT)
    _, cache = model.run_with_cache(eval_tokens, names_filter="blocks.1.hook_resid_pre")
    x = cache["blocks.1.hook_resid_pre"].reshape(-1, D_MODEL)

    configs = {
        "sampled": SampledTrainingSAEConfig(
            d_in=D_MODEL, d_sae=D_SAE, k=K, pool_factor=4, pool_seed=0
        ),
        "mutual_choice": MutualChoiceTrainingSAEConfig(d_in=D_MODEL, d_sae=D_SAE, k=K),
        "batchtopk": BatchTopKTrainingSAEConfig(d_in=D_MODEL, d_sae=D_SAE, k=K),
    }
    print(f"{'architecture':15s} {'L0':>6s} {'expl. var.':>10s}")
    for name, sae_cfg in configs.items():
        with tempfile.TemporaryDirectory() as tmp:
            cfg = LanguageModelSAERunnerConfig(
                sae=sae_cfg, hook_name="blocks.1.hook_resid_pre", dataset_path="",
                streaming=False, context_size=CONTEXT, prepend_bos=False,
                training_tokens=STEPS * BATCH, train_batch_size_tokens=BATCH,
                store_batch_size_prompts=16, n_batches_in_buffer=32, lr=3e-4,
                device="cpu", seed=0, logger=LoggingConfig(log_to_wandb=False),
                n_checkpoints=0, checkpoint_path=str(Path(tmp) / "ckpt"),
                output_path=str(Path(tmp) / "out"), verbose=False,
                exclude_special_tokens=False,
            )  # fmt: skip
            sae = LanguageModelSAETrainingRunner(
                cfg, override_model=model, override_dataset=dataset
            ).run()
        sae.eval()  # per-token inference encode (thresholds) for the plugin SAEs
        with torch.no_grad():
            acts = sae.encode(x)
            recon = sae.decode(acts)
        l0 = (acts != 0).sum(-1).float().mean().item()
        explained = 1 - (recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        print(f"{name:15s} {l0:6.2f} {explained.item():10.3f}")


if __name__ == "__main__":
    main()
