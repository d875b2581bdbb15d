"""kdflow.topk.block_topk: torch.topk's values and ids from the k blocks of the largest maxima."""

from __future__ import annotations

import pytest
import torch

from kdflow.topk import block_topk


@pytest.mark.parametrize(("width", "k", "block"), [(49152, 16, 128), (5000, 4, 64), (4099, 16, 32), (3000, 1, 16)])
def test_block_topk_is_torch_topk(width, k, block):
    g = torch.Generator().manual_seed(width + k)
    x = torch.randn(37, width, generator=g) * 4
    x[0, :] = x[0, :].sort().values  # the largest entries crowded into the last blocks
    x[1, :] = 0.0
    x[1, 7 * block + 3] = 9.0  # one entry far above the rest, and ties everywhere else
    values, ids = block_topk(x, k, block)
    want = torch.topk(x, k, dim=-1)
    assert torch.equal(values, want.values)
    assert torch.equal(x.gather(1, ids), values)  # each id holds its value (ids among ties may differ)
    assert bool((ids[2:] == want.indices[2:]).all()) and int(ids[1, 0]) == 7 * block + 3
    assert all(len(set(r.tolist())) == k for r in ids)


def test_a_row_with_fewer_finite_entries_than_k_and_the_fallbacks():
    x = torch.full((3, 1000), -float("inf"))
    x[:, 996:] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # only 4 finite entries, the row no multiple of the block
    values, ids = block_topk(x, 6, 64)
    assert torch.equal(values, torch.topk(x, 6, dim=-1).values) and bool((ids < 1000).all())
    small = torch.randn(2, 50)
    assert torch.equal(block_topk(small, 5)[1], torch.topk(small, 5, dim=-1).indices)  # few blocks: torch.topk
    with pytest.raises(ValueError, match=r"expected a \[n, V\] matrix"):
        block_topk(torch.randn(50), 5)


def test_exp_rows_shifts_only_rows_whose_maximum_is_outside_the_raw_range():
    from kdflow.topk import EXP_RAW, exp_rows_

    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4000, generator=g) * 3
    x[1] += 500.0  # exp(x) would overflow: shifted
    x[2] -= 200.0  # exp(x) would underflow: shifted
    x[3] += 50.0  # inside the raw range: not shifted
    want = torch.softmax(x.double(), -1)
    row_max = x.amax(-1, keepdim=True)
    y = x.clone()
    shift = exp_rows_(y, row_max)
    assert shift.shape == (5, 1) and float(shift[1]) == float(row_max[1]) and float(shift[2]) == float(row_max[2])
    assert float(shift[0]) == float(shift[3]) == float(shift[4]) == 0.0
    assert EXP_RAW[0] <= float(row_max[3]) <= EXP_RAW[1]
    assert bool(torch.isfinite(y).all()) and bool((y.sum(-1) > 0).all())
    torch.testing.assert_close(y.double() / y.double().sum(-1, keepdim=True), want, rtol=1e-5, atol=1e-12)
    assert torch.equal(y[0], x[0].exp()) and torch.equal(y[1], (x[1] - row_max[1]).exp())
