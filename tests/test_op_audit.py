"""The op counter behind the host-sync audit counts what it claims to."""

import torch

from benchmarks.op_audit import count_ops


def test_counts_value_reads_and_data_dependent_shapes() -> None:
    x = torch.tensor([0.0, 2.0, 0.0, 3.0])

    def run() -> None:
        int(x.sum())  # a value read
        x.nonzero()  # a data-dependent size
        x[x > 1]  # boolean-mask indexing
        x[torch.tensor([1, 3])]  # integer indexing: no sync
        torch.topk(x, 2)  # fixed size: no sync

    counts = count_ops(run)
    assert counts.syncs["aten._local_scalar_dense"] == 1
    assert counts.syncs["aten.nonzero"] == 1
    assert counts.syncs["aten.index"] == 1
    assert counts.n_syncs == 3
    assert counts.by_name["aten.topk"] == 1
    assert counts.total >= 7


def test_fixed_size_ops_do_not_count_as_syncs() -> None:
    x = torch.randn(8, 16)

    def run() -> None:
        values, indices = x.topk(3, dim=-1)
        torch.zeros_like(x).scatter_(-1, indices, values)
        torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 1]), output_size=4)

    assert count_ops(run).n_syncs == 0


def test_host_reads_without_an_op_count_as_syncs() -> None:
    x = torch.arange(4.0)

    def run() -> None:
        x.tolist()
        x.numpy()

    counts = count_ops(run)
    assert counts.syncs["tolist"] == 1
    assert counts.syncs["numpy"] == 1
    assert counts.n_syncs == 2
