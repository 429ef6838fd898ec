"""KVCache.compact: finished rows leave the batch and the padding they all shared goes with them."""

from __future__ import annotations

import torch

from steward.model.kv_cache import KVCache


def test_compact_keeps_rows_and_drops_shared_left_padding() -> None:
    cache = KVCache(n_layers=2, batch_size=3, n_heads=1, max_len=8, d_head=2)
    # Left-padded prompts of real lengths 2, 4 and 3 (width 4), then one decoding step.
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    cache.record(mask)
    for layer in range(2):
        k = torch.arange(3 * 4 * 2, dtype=torch.float32).reshape(1, 3, 1, 4, 2).squeeze(0) + 100 * layer
        cache.update(layer, k, -k)
    cache.advance(4)
    cache.record_real(1)
    for layer in range(2):
        step = torch.full((3, 1, 1, 2), 1000.0 + layer)
        cache.update(layer, step, -step)
    cache.advance(1)
    before_k = cache.k.clone()

    keep = torch.tensor([0, 2])  # row 1, the only one that used column 0, finished
    cache.compact(keep)

    assert cache.length == 4  # 5 columns, the first shared only by padding of the rows kept
    assert cache.k.shape == (2, 2, 1, 8, 2)
    assert torch.equal(cache.k[:, :, :, :4], before_k[:, keep, :, 1:5])
    assert torch.equal(cache.v[:, :, :, :4], -before_k[:, keep, :, 1:5])
    assert cache.key_valid[:, :4].tolist() == [[False, True, True, True], [True, True, True, True]]
    assert not cache.key_valid[:, 4:].any()
    assert cache.valid_count.tolist() == [3, 4]
    assert cache.has_padding


def test_compact_without_padding_left() -> None:
    cache = KVCache(n_layers=1, batch_size=2, n_heads=1, max_len=4, d_head=1)
    cache.record(torch.tensor([[0, 1], [1, 1]], dtype=torch.bool))
    cache.update(0, torch.ones(2, 1, 2, 1), torch.ones(2, 1, 2, 1))
    cache.advance(2)
    cache.compact(torch.tensor([1]))
    assert cache.length == 2 and not cache.has_padding and cache.valid_count.tolist() == [2]
