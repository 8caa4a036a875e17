"""The op budget: each architecture's training step stays within a multiple of
BatchTopK's op count.

A GPU step is mostly fixed cost per op at the widths where the plugin is slower, so
the number of ATen ops one training forward + backward dispatches (counted on CPU by
``benchmarks.op_audit``) is the budget. Each ceiling is a ratio to SAELens's
``batchtopk`` measured in the same test run, set at what the step reaches today (a
little headroom for rounding); lower it whenever the step gets cheaper. The goal is
1.5x (2.0x for ``feature_choice``, whose selection does more): the fixed-shape path
meets it; the CPU path, whose data-dependent selection is faster on a CPU, does not.
"""

import pytest

from benchmarks.op_audit import AuditShape, OpCounts, audit, main
from sae_lens_sampled._registry import architecture_keys

# Ops of one training step relative to BatchTopK's, at most: on a CPU's default
# path, and on the fixed-shape path that a GPU and torch.compile take.
CEILINGS = {
    "mutual_choice": 1.61,
    "sampled": 1.76,
    "feature_choice": 2.11,
}
FIXED_SHAPE_CEILINGS = {
    "mutual_choice": 1.27,
    "sampled": 1.43,
    "feature_choice": 1.41,
}
# Fields that make an audited step reproducible (the sampled pool draw).
FIELDS = {"sampled": {"pool_seed": 0}}


@pytest.fixture(scope="module")
def batchtopk() -> OpCounts:
    return audit("batchtopk", AuditShape())


def test_every_architecture_has_a_budget() -> None:
    assert set(CEILINGS) == set(architecture_keys())
    assert set(FIXED_SHAPE_CEILINGS) == set(architecture_keys())


@pytest.mark.parametrize("fixed_shapes", [False, True], ids=["cpu_path", "fixed"])
@pytest.mark.parametrize("architecture", sorted(CEILINGS))
def test_training_step_stays_within_its_op_budget(
    architecture: str, fixed_shapes: bool, batchtopk: OpCounts
) -> None:
    fields = FIELDS.get(architecture, {})
    counts = audit(architecture, AuditShape(), fixed_shapes, **fields)
    ratio = counts.total / batchtopk.total
    ceiling = (FIXED_SHAPE_CEILINGS if fixed_shapes else CEILINGS)[architecture]
    assert ratio <= ceiling, (
        f"{architecture}: {counts.total} ops per training step, {ratio:.3f}x "
        f"BatchTopK's {batchtopk.total}; the budget is {ceiling}x "
        f"(most frequent: {counts.by_name.most_common(8)})"
    )


def test_the_audit_command_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    # docs/performance.md: python -m benchmarks.op_audit --verbose
    main(["--verbose"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| | ops | ops vs BatchTopK | sync ops |"
    rows = {line.split("|")[1].strip(" `"): line for line in lines[2:]}
    assert set(rows) == {"batchtopk", *CEILINGS}
    assert rows["batchtopk"].split("|")[3].strip() == "1.00"
