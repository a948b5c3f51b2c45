"""SlotView's one-row and packed-slot shortcuts (positions, advance) against the general gather path."""

import torch

from moesaic.inference.cache import SlotCache


def _cache() -> SlotCache:
    c = SlotCache(n_layers=1, n_slots=4, n_kv_heads=2, max_len=16, k_dim=4, v_dim=4)
    c.lengths.copy_(torch.tensor([3, 5, 7, 2]))
    return c


def test_one_row_positions_and_advance():
    c = _cache()
    v = c.view([1])
    pos = v.positions(1)
    assert pos.tolist() == [[5]]
    k = torch.randn(1, 2, 1, 4)
    k_all, _, mask = v.update(0, k, k.clone())
    assert mask is None and k_all.shape == (1, 2, 6, 4)
    torch.testing.assert_close(k_all[:, :, 5], k[:, :, 0])
    v.advance(1)
    assert pos.tolist() == [[5]]  # a copy: advancing the lengths does not move the forward's positions
    assert c.lengths.tolist() == [3, 6, 7, 2]


def test_packed_and_gathered_views_agree():
    a, b = _cache(), _cache()
    va, vb = a.view([1, 2]), b.view([2, 1])  # packed range vs gather (reversed order)
    assert va.positions(3).tolist() == [[5, 6, 7], [7, 8, 9]]
    assert vb.positions(3).tolist() == [[7, 8, 9], [5, 6, 7]]
    va.advance(3)
    vb.advance(3)
    assert a.lengths.tolist() == b.lengths.tolist() == [3, 8, 10, 2]
    vn = a.view([0, 3], n_new=[2, 1])  # a padded prefill commits only each row's real tokens
    vn.advance(2)
    assert a.lengths.tolist() == [5, 8, 10, 3]
