"""2-D scan orders and ScanMixer (DESIGN.md §5): permutations against hand-computed and
first-principles orders, inverse round trips, equivalence with the bare mixer on a permuted
sequence, causality in scan order, bidirectional reversal symmetry, config errors."""

import pytest
import torch

from unidiff.errors import ConfigError
from unidiff.models.mamba2 import Mamba2Mixer
from unidiff.models.scan import SCAN_ORDERS, ScanMixer, inverse_permutation, scan_permutation

MIX = dict(d_state=8, headdim=8, n_groups=1, chunk_size=4)
D = 16


def _visit_order(order, gh, gw):
    """The order's walk over (row, col) cells, written out cell by cell, as row-major indices."""
    if order.startswith("row"):
        cells = [(i, j) for i in range(gh) for j in range(gw)]
    else:
        cells = [(i, j) for j in range(gw) for i in range(gh)]
    if order.endswith("_rev"):
        cells = cells[::-1]
    return [i * gw + j for i, j in cells]


def test_hand_computed_2x3():
    # Grid of row-major indices: [[0, 1, 2], [3, 4, 5]].
    expected = {
        "row": [0, 1, 2, 3, 4, 5],
        "row_rev": [5, 4, 3, 2, 1, 0],
        "col": [0, 3, 1, 4, 2, 5],
        "col_rev": [5, 2, 4, 1, 3, 0],
    }
    for order, ref in expected.items():
        assert scan_permutation(order, 2, 3).tolist() == ref, order


@pytest.mark.parametrize("gh,gw", [(1, 1), (1, 5), (4, 1), (3, 4), (5, 2)])
@pytest.mark.parametrize("order", SCAN_ORDERS)
def test_orders_are_permutations_with_inverses(order, gh, gw):
    perm = scan_permutation(order, gh, gw)
    L = gh * gw
    assert perm.dtype == torch.long and perm.shape == (L,)
    assert perm.tolist() == _visit_order(order, gh, gw)
    assert sorted(perm.tolist()) == list(range(L))
    inv = inverse_permutation(perm)
    x = torch.randn(2, L, 3)
    assert torch.equal(x[:, perm][:, inv], x) and torch.equal(x[:, inv][:, perm], x)


def test_rev_is_flip_and_col_is_transpose():
    gh, gw = 3, 5
    assert torch.equal(scan_permutation("row_rev", gh, gw), scan_permutation("row", gh, gw).flip(0))
    assert torch.equal(scan_permutation("col_rev", gh, gw), scan_permutation("col", gh, gw).flip(0))
    # Column-major over a (gh, gw) grid visits the transposed grid's cells in row-major order.
    grid = torch.arange(gh * gw).view(gh, gw)
    assert torch.equal(scan_permutation("col", gh, gw), grid.T.flatten())


def test_unknown_order_is_a_config_error():
    with pytest.raises(ConfigError, match="row_rev"):
        scan_permutation("diagonal", 2, 2)
    with pytest.raises(ConfigError, match="bidirectional"):
        ScanMixer(D, (2, 2), order="zigzag", **MIX)


@pytest.mark.parametrize("order", SCAN_ORDERS)
def test_scan_mixer_is_the_mixer_on_the_permuted_sequence(order):
    torch.manual_seed(0)
    gh, gw, R = 3, 4, 2
    sm = ScanMixer(D, (gh, gw), order=order, num_registers=R, **MIX)
    x = torch.randn(2, gh * gw + R, D)
    perm = _visit_order(order, gh, gw)
    seq = torch.cat([x[:, perm], x[:, gh * gw:]], dim=1)  # scan order, registers last
    ref_seq = sm.mixer(seq)
    ref = torch.empty_like(ref_seq)
    ref[:, perm] = ref_seq[:, : gh * gw]  # put each scanned output back at its patch
    ref[:, gh * gw:] = ref_seq[:, gh * gw:]
    torch.testing.assert_close(sm(x), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("order", SCAN_ORDERS)
def test_directional_scan_is_causal_in_scan_order(order):
    torch.manual_seed(0)
    gh, gw, R = 3, 3, 1
    sm = ScanMixer(D, (gh, gw), order=order, num_registers=R, **MIX)
    perm = _visit_order(order, gh, gw)
    x = torch.randn(1, gh * gw + R, D)
    y = sm(x)
    k = 4  # perturb the patch scanned 5th
    x2 = x.clone()
    x2[:, perm[k]] += 1.0
    y2 = sm(x2)
    earlier, later = perm[:k], perm[k:]
    torch.testing.assert_close(y2[:, earlier], y[:, earlier], atol=0, rtol=0)
    assert (y2[:, later] - y[:, later]).abs().amax(dim=-1).min() > 0
    assert (y2[:, -R:] - y[:, -R:]).abs().max() > 0  # registers come last: they see every patch


@pytest.mark.parametrize("grid", [(1, 10), (3, 4)])
def test_bidirectional_commutes_with_reversal(grid):
    torch.manual_seed(0)
    sm = ScanMixer(D, grid, order="bidirectional", num_registers=0, **MIX)
    x = torch.randn(2, grid[0] * grid[1], D)
    torch.testing.assert_close(sm(x.flip(1)), sm(x).flip(1), atol=1e-5, rtol=1e-4)


def test_bidirectional_is_the_average_of_both_scans():
    torch.manual_seed(0)
    gh, gw, R = 2, 3, 1
    sm = ScanMixer(D, (gh, gw), order="bidirectional", num_registers=R, **MIX)
    x = torch.randn(2, gh * gw + R, D)
    L = gh * gw
    fwd = sm.mixer(x)
    bwd = sm.mixer(torch.cat([x[:, :L].flip(1), x[:, L:]], dim=1))
    ref = torch.cat([(fwd[:, :L] + bwd[:, :L].flip(1)) / 2, (fwd[:, L:] + bwd[:, L:]) / 2], dim=1)
    torch.testing.assert_close(sm(x), ref, atol=1e-6, rtol=1e-5)
    # And it sees both ways: the first patch depends on the last one.
    x2 = x.clone()
    x2[:, L - 1] += 1.0
    assert (sm(x2)[:, 0] - sm(x)[:, 0]).abs().max() > 0


def test_buffers_are_not_saved_and_lengths_are_checked():
    sm = ScanMixer(D, (2, 2), order="col", num_registers=1, **MIX)
    assert not any(k.endswith("perm") for k in sm.state_dict())
    assert set(sm.state_dict()) == {f"mixer.{k}" for k in Mamba2Mixer(D, **MIX).state_dict()}
    with pytest.raises(ConfigError, match="num_registers"):
        sm(torch.randn(1, 4, D))
