"""Data-parallel training with exact global-batch selection: W ranks train the same
SAE as one process fed the concatenated batch (``docs/distributed.md``)."""

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
