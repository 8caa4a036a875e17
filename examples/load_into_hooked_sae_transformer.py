"""Load a trained plugin SAE into HookedSAETransformer and look at its features.

Pass the output directory of one of the train_*.py examples (or of
`sae-lens-sampled train`). The model named in the SAE's metadata (Pythia-160M for the
train_*.py examples) and its tokenizer come from the Hugging Face hub:
`load_model_and_tokens_from_hub` is the only part that needs it. With ``--offline``,
for an SAE trained by a train_*.py example with ``--offline``, the model is that
example's tiny random stand-in and the tokens its generated rows: nothing is
downloaded. The test suite runs it both ways.

    python examples/load_into_hooked_sae_transformer.py sampled_l6
    python examples/train_sampled.py --offline --output /tmp/sampled_tiny --k 4
    python examples/load_into_hooked_sae_transformer.py /tmp/sampled_tiny --offline
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

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


def load_offline_model_and_tokens(
    sae: SAE, n_rows: int = 64
) -> tuple[HookedSAETransformer, torch.Tensor]:
    """The train_*.py examples' ``--offline`` stand-in (the same random weights the
    SAE was trained on) as a HookedSAETransformer, and ``n_rows`` of its token rows."""
    from pythia_setup import offline_stand_in

    plain, dataset = offline_stand_in()
    model = HookedSAETransformer(plain.cfg)
    model.load_state_dict(plain.state_dict())
    tokens = torch.tensor(dataset[:n_rows]["tokens"])
    return model.to(sae.device, print_details=False), tokens.to(sae.device)


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


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sae_path", nargs="?", default="sampled_l6")
    parser.add_argument(
        "--offline",
        action="store_true",
        help="the train_*.py examples' tiny random model and generated tokens (for "
        "an SAE trained with their --offline; nothing downloaded)",
    )
    args = parser.parse_args(argv)
    device = "cpu" if args.offline or not torch.cuda.is_available() else "cuda"
    sae = SAE.load_from_disk(args.sae_path, device=device)
    print(type(sae).__name__, sae.cfg.metadata.hook_name, "d_sae =", sae.cfg.d_sae)
    if args.offline:
        model, tokens = load_offline_model_and_tokens(sae)
    else:
        model, tokens = load_model_and_tokens_from_hub(sae)
    return walk_through(model, sae, tokens)


if __name__ == "__main__":
    main()
