"""Writes this folder's files; run once with sae-lens-sampled 0.2 on the path.

``PYTHONPATH=<a 0.2 checkout> python tests/data/saved_0_2/write_files.py``: for each
architecture, a training SAE (d_in 4, d_sae 8, k 2) takes three SGD steps and is saved
with ``save_model`` (``training/``) and ``save_inference_model`` (``inference/``);
``outputs.safetensors`` holds what the saved SAEs, loaded back by 0.2, give on a fixed
input (``encode`` and ``encode_batch`` of each).
"""

from pathlib import Path

import torch
from sae_lens import SAE, TrainingSAE
from sae_lens.saes.sae import TrainStepInput
from safetensors.torch import save_file

from sae_lens_sampled import (
    FeatureChoiceTrainingSAE,
    FeatureChoiceTrainingSAEConfig,
    MutualChoiceTrainingSAE,
    MutualChoiceTrainingSAEConfig,
    SampledTrainingSAE,
    SampledTrainingSAEConfig,
)

HERE = Path(__file__).parent
CONFIGS = {
    "sampled": lambda: SampledTrainingSAE(
        SampledTrainingSAEConfig(d_in=4, d_sae=8, k=2, pool_factor=2, pool_seed=0)
    ),
    "feature_choice": lambda: FeatureChoiceTrainingSAE(
        FeatureChoiceTrainingSAEConfig(d_in=4, d_sae=8, k=2)
    ),
    "mutual_choice": lambda: MutualChoiceTrainingSAE(
        MutualChoiceTrainingSAEConfig(d_in=4, d_sae=8, k=2)
    ),
}


def fixed_input() -> torch.Tensor:
    return torch.randn(6, 4, generator=torch.Generator().manual_seed(1))


def main() -> None:
    # 0.2 has no pool_fraction; a later checkout would write other files.
    assert "pool_fraction" not in SampledTrainingSAEConfig.__dataclass_fields__
    for architecture, make_sae in CONFIGS.items():
        torch.manual_seed(0)
        sae = make_sae()
        optimizer = torch.optim.SGD(sae.parameters(), lr=0.05)
        for _ in range(3):
            step = TrainStepInput(
                sae_in=torch.randn(16, 4),
                coefficients={},
                dead_neuron_mask=None,
                n_training_steps=0,
                is_logging_step=False,
            )
            output = sae.training_forward_pass(step)
            optimizer.zero_grad()
            output.loss.backward()
            optimizer.step()
        folder = HERE / architecture
        sae.save_model(folder / "training")
        sae.save_inference_model(folder / "inference")
        x = fixed_input()
        outputs = {}
        with torch.no_grad():
            training = TrainingSAE.load_from_disk(folder / "training").eval()
            outputs["training.encode"] = training.encode(x)
            outputs["training.encode_batch"] = training.encode_batch(x)
            inference = SAE.load_from_disk(folder / "inference")
            outputs["inference.encode"] = inference.encode(x)
            outputs["inference.encode_batch"] = inference.encode_batch(x)
        save_file(outputs, folder / "outputs.safetensors")
        print(architecture, {name: int((v != 0).sum()) for name, v in outputs.items()})


if __name__ == "__main__":
    main()
