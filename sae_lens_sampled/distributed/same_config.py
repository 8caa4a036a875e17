"""Every data-parallel rank must train the same SAE with the same settings.

Ranks that disagree fail far from the cause (a collective that aborts or hangs,
replicas that drift apart), so at start-up the ranks compare a digest of their
settings, and where any differs every rank raises the same error naming the first
differing field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from sae_lens_sampled.distributed.comm import Comm

Description = list[tuple[str, str]]

# Each rank places itself on its own device; these may differ.
PER_RANK_FIELDS = frozenset({"device", "llm_device", "act_store_device"})
ABSENT = "(absent)"


class ConfigMismatchError(ValueError):
    """Data-parallel ranks were started with different settings."""


def describe_settings(settings: Mapping[str, Any], prefix: str = "") -> Description:
    """``settings`` (nested mappings allowed) as ``(dotted field, JSON value)`` pairs,
    in order, without the per-rank device fields."""
    described: Description = []
    for name, value in settings.items():
        if name in PER_RANK_FIELDS:
            continue
        if isinstance(value, Mapping):
            described.extend(describe_settings(value, f"{prefix}{name}."))
        else:
            text = json.dumps(value, sort_keys=True, default=repr)
            described.append((f"{prefix}{name}", text))
    return described


def describe_dataclass(config: Any, prefix: str) -> Description:
    """A dataclass instance's fields, as :func:`describe_settings` describes them."""
    settings: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        settings[field.name] = value
    return describe_settings(settings, prefix)


def first_difference(
    reference: Description, other: Description
) -> tuple[str, str, str] | None:
    """The first field (in ``reference``'s order, then ``other``'s extra fields) whose
    values differ: ``(field, reference value, other value)``, or None."""
    ours, theirs = dict(reference), dict(other)
    names = [name for name, _ in reference]
    names += [name for name, _ in other if name not in ours]
    for name in names:
        mine, its = ours.get(name, ABSENT), theirs.get(name, ABSENT)
        if mine != its:
            return name, mine, its
    return None


def check_same_settings(comm: Comm, description: Description, what: str) -> None:
    """Raise :class:`ConfigMismatchError`, on every rank alike, unless every rank of
    ``comm`` passed the same ``description`` (of ``what``, for the message)."""
    if not comm.active:
        return
    digest = hashlib.sha256(json.dumps(description).encode()).hexdigest()
    digests = comm.all_gather_object(digest)
    if len(set(digests)) == 1:
        return
    descriptions = comm.all_gather_object(description)
    differing = [r for r, d in enumerate(digests) if d != digests[0]]
    rank = differing[0]
    difference = first_difference(descriptions[0], descriptions[rank])
    assert difference is not None  # the digests differ
    field, reference, other = difference
    raise ConfigMismatchError(
        f"data-parallel ranks must share one {what}: rank {rank} has {field}={other}, "
        f"rank 0 has {field}={reference} (first differing field; ranks differing "
        f"from rank 0: {', '.join(map(str, differing))}). Start every rank with the "
        "same settings"
    )
