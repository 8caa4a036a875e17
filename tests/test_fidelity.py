"""Per-token inference of an SAE straight out of SAELens's runner matches its batch rule.

No calibration step: the thresholds learned during training must give, on held-out
data, a per-token L0 within 5% of the batch rule's and an explained variance no more
than 0.02 (Mutual and Feature Choice) or 0.05 (Sampled-SAE) below it. A small
synthetic model (SAELens's ``sae_lens.synthetic``) keeps each run to a second or two.
"""

from functools import cache

import pytest
import torch
from sae_lens import LoggingConfig
from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig
from sae_lens.synthetic.firing_magnitudes import LinearMagnitudeConfig
from sae_lens.synthetic.firing_probabilities import ZipfianFiringProbabilityConfig
from sae_lens.synthetic.synthetic_sae_runner import (
    SyntheticSAERunner,
    SyntheticSAERunnerConfig,
)

from sae_lens_sampled.benchmark.runs import to_inference_sae
from sae_lens_sampled.benchmark.specs import build_sae_config, parse_run_specs

STEPS, BATCH, K, D_SAE, HIDDEN = 200, 256, 3, 64, 16

MUTUAL_FEATURE = ["mutual_choice", "feature_choice"]
SAMPLED = [
    "sampled:pool_factor=4",
    "sampled:pool_factor=4,pool_mode=top",
    "sampled:pool_factor=16",
    "sampled:pool_factor=16,pool_mode=top,score=entropy",
]
# Matches the L0 but not the explained variance: with a pool of 12 of 64 features
# drawn at random each batch, every feature learns to cover a token alone, and per
# token such features fire together (docs/sampled.md, "Inference").
SMALL_RANDOM_POOL = "sampled:pool_factor=4,score=uniform"


@cache
def synthetic_model() -> SyntheticModel:
    return SyntheticModel(
        SyntheticModelConfig(
            num_features=64,
            hidden_dim=HIDDEN,
            firing_probability=ZipfianFiringProbabilityConfig(
                exponent=0.7, max_prob=0.3, min_prob=0.01
            ),
            mean_firing_magnitudes=LinearMagnitudeConfig(start=1.0, end=4.0),
            std_firing_magnitudes=0.2,
            seed=0,
        )
    )


@cache
def held_out() -> torch.Tensor:
    model = synthetic_model()
    torch.manual_seed(1)
    return model.feature_dict(model.activation_generator.sample(8192))


def explained_variance(x: torch.Tensor, reconstruction: torch.Tensor) -> float:
    residual = (x - reconstruction).pow(2).sum()
    return (1 - residual / (x - x.mean(0)).pow(2).sum()).item()


@cache
def measure(label: str) -> dict[str, float]:
    """Train through SAELens's runner, export as saved, measure on held-out data."""
    spec = parse_run_specs(label)[0]
    sae_cfg = build_sae_config(spec, d_in=HIDDEN, d_sae=D_SAE, k=K)
    runner_cfg = SyntheticSAERunnerConfig(
        synthetic_model=synthetic_model().cfg,
        sae=sae_cfg,
        training_samples=STEPS * BATCH,
        batch_size=BATCH,
        lr=3e-3,
        lr_decay_steps=STEPS // 5,
        device="cpu",
        checkpoint_path=None,
        output_path=None,
        run_final_eval=False,
        logger=LoggingConfig(log_to_wandb=False),
    )
    torch.manual_seed(0)
    runner = SyntheticSAERunner(runner_cfg, override_synthetic_model=synthetic_model())
    sae = to_inference_sae(runner.run().sae)  # what save_inference_model writes
    x = held_out()
    with torch.no_grad():
        per_token = sae.encode(x)
        batch_rule = torch.cat([sae.encode_batch(b) for b in x.split(BATCH)])
        return {
            "l0_token": (per_token > 0).sum(-1).float().mean().item(),
            "l0_batch": (batch_rule > 0).sum(-1).float().mean().item(),
            "ev_token": explained_variance(x, sae.decode(per_token)),
            "ev_batch": explained_variance(x, sae.decode(batch_rule)),
        }


@pytest.mark.parametrize("label", [*MUTUAL_FEATURE, *SAMPLED, SMALL_RANDOM_POOL])
def test_per_token_l0_matches_the_batch_rule(label):
    result = measure(label)
    assert result["l0_batch"] == pytest.approx(K, abs=0.01)
    assert result["l0_token"] == pytest.approx(result["l0_batch"], rel=0.05), result


@pytest.mark.parametrize(
    "label",
    [
        *MUTUAL_FEATURE,
        *SAMPLED,
        pytest.param(
            SMALL_RANDOM_POOL,
            marks=pytest.mark.xfail(
                strict=True, reason="small random pools: per-token EV falls short"
            ),
        ),
    ],
)
def test_per_token_explained_variance_is_close_to_the_batch_rule(label):
    result = measure(label)
    allowed = 0.05 if label.startswith("sampled") else 0.02
    assert result["ev_token"] >= result["ev_batch"] - allowed, result
