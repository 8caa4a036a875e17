"""Load a trained plugin SAE into HookedSAETransformer and look at its features.

Pass the output directory of one of the train_*.py examples (or of
`sae-lens-sampled train`). The model named in the SAE's metadata (Pythia-160M for the
train_*.py examples) and its tokenizer come from the Hugging Face hub:
`load_model_and_tokens_from_hub` is the only part that needs it. The test suite runs
`main` with that function replaced by a tiny random model and random tokens.

    python examples/load_into_hooked_sae_transformer.py sampled_l6
"""

from __future__ import annotations

import sys

import torch
from sae_lens import SAE, HookedSAETransformer

import sae_lens_sampled  # noqa: F401  (registers the architectures; the autoload hook also does)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Sparse autoencoders split a model's activations into features.",
    "In 1969 the first humans walked on the Moon.",
    "def add(a, b):\n    return a + b",
]


def load_model_and_tokens_from_hub(
    sae: SAE,
) -> tuple[HookedSAETransformer, torch.Tensor]:
    """NEEDS THE HUGGING FACE HUB: the model the SAE was trained on, and ``TEXTS``
    through its tokenizer (padded to the longest text)."""
    model = HookedSAETransformer.from_pretrained_no_processing(
        sae.cfg.metadata.model_name, device=sae.device
    )
    return model, model.to_tokens(TEXTS)


@torch.no_grad()
def walk_through(
    model: HookedSAETransformer, sae: SAE, tokens: torch.Tensor
) -> dict[str, float]:
    """Run the SAE inside the model; compare per-token codes with the batch rule."""
    # %% Per-token features inside the model: the SAE replaces its hook point, so
    # the cache holds the SAE's own hooks (its input is `<hook>.hook_sae_input`).
    _, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
    hook = sae.cfg.metadata.hook_name
    acts = cache[f"{hook}.hook_sae_acts_post"]  # [batch, seq, d_sae]
    sae_in = cache[f"{hook}.hook_sae_input"]
    # Each token is encoded alone (JumpReLU thresholds learned in training), so a
    # token's code does not depend on the rest of the batch.
    l0_token = (acts > 0).sum(-1).float().mean().item()

    # %% The batch-level training rule over the same tokens, for comparison. The
    # thresholds were learned so that each feature fires per token about as often as
    # this rule selects it; no calibration step is needed.
    batch_acts = sae.encode_batch(sae_in.flatten(0, 1))
    l0_batch = (batch_acts > 0).sum(-1).float().mean().item()
    print(f"mean L0 per token {l0_token:.2f}, under the batch rule {l0_batch:.2f}")

    # %% The strongest features of the last token.
    values, features = acts[0, -1].topk(5)
    rounded = [round(v, 3) for v in values.tolist()]
    top = list(zip(features.tolist(), rounded, strict=True))
    print("top features of the last token:", top)
    return {"l0_token": l0_token, "l0_batch": l0_batch}


def main(sae_path: str) -> dict[str, float]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sae = SAE.load_from_disk(sae_path, device=device)
    print(type(sae).__name__, sae.cfg.metadata.hook_name, "d_sae =", sae.cfg.d_sae)
    model, tokens = load_model_and_tokens_from_hub(sae)
    return walk_through(model, sae, tokens)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "sampled_l6")
