"""Load a trained plugin SAE into HookedSAETransformer and look at its features.

NEEDS THE HUGGING FACE HUB for the model (Pythia-160M here). Pass the output directory
of one of the train_*.py examples (or of `sae-lens-sampled train`).

    python examples/load_into_hooked_sae_transformer.py sampled_l6
"""

import sys

import torch
from sae_lens import SAE, HookedSAETransformer

import sae_lens_sampled  # noqa: F401  (registers the architectures; the autoload hook also does)
from sae_lens_sampled import calibrate_thresholds

sae_path = sys.argv[1] if len(sys.argv) > 1 else "sampled_l6"

# %% Load the SAE (a SampledSAE, MutualChoiceSAE or FeatureChoiceSAE) and the model.
sae = SAE.load_from_disk(
    sae_path, device="cuda" if torch.cuda.is_available() else "cpu"
)
print(type(sae).__name__, sae.cfg.metadata.hook_name, "d_sae =", sae.cfg.d_sae)
model = HookedSAETransformer.from_pretrained_no_processing(
    sae.cfg.metadata.model_name, device=sae.device
)

# %% Per-token features inside the model: the SAE's hooks appear in the cache.
text = "The quick brown fox jumps over the lazy dog. Sparse autoencoders find features."
tokens = model.to_tokens(text)
_, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
hook = sae.cfg.metadata.hook_name
acts = cache[f"{hook}.hook_sae_acts_post"][0]  # [seq, d_sae], each token encoded alone
print("L0 per token:", (acts > 0).sum(-1).tolist())

# %% The batch-level training rule over the same tokens, for comparison.
resid = cache[hook][0]
batch_acts = sae.encode_batch(resid)
print(
    "mean L0 per token under the batch rule:",
    (batch_acts > 0).sum(-1).float().mean().item(),
)

# %% Re-fit the thresholds on more text if per-token L0 drifts from k (small pools,
# short runs), then look at the strongest features of one token.
_, cache = model.run_with_cache(model.to_tokens([text] * 8), names_filter=hook)
calibrate_thresholds(sae, [cache[hook].flatten(0, 1)])
acts = sae.encode(resid)
values, features = acts[-1].topk(5)
print(
    "top features of the last token:",
    list(zip(features.tolist(), values.tolist(), strict=True)),
)
