"""Data-parallel training with exact global-batch selection.

``DistributedSAETrainer`` trains any of the plugin's architectures over a batch split
across ``torch.distributed`` ranks so that W ranks train the same SAE as one process
fed the concatenated batch; ``torchrun --nproc_per_node N -m sae_lens_sampled train
...`` runs SAELens's training CLI that way.
"""

from sae_lens_sampled.distributed.comm import Comm, TrafficCounter
from sae_lens_sampled.distributed.same_config import ConfigMismatchError
from sae_lens_sampled.distributed.step import (
    DataParallelStep,
    data_parallel_step,
    register_data_parallel_rule,
)
from sae_lens_sampled.distributed.trainer import DistributedSAETrainer

__all__ = [
    "Comm",
    "ConfigMismatchError",
    "DataParallelStep",
    "DistributedSAETrainer",
    "TrafficCounter",
    "data_parallel_step",
    "register_data_parallel_rule",
]
