"""`lorakit.serve.kv_cache`: the prefix cache (lookup, store, LRU, forget) and the running batch's cache (join with
left padding, trimming columns that became padding in every row)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from lorakit.serve.kv_cache import BatchCache, PrefixCache, pad_left, stack_prefixes


def test_prefix_cache_lookup_store_evict_forget() -> None:
    cache = PrefixCache(block=2, max_tokens=6)  # three blocks
    kv = lambda b: [(torch.full((1, 2, 3), float(b)), torch.full((1, 2, 3), -float(b)))]  # noqa: E731
    assert cache.lookup("a", [1, 2, 3, 4, 5]) == (0, None) and cache.hits == 0
    cache.store("a", [1, 2, 3, 4, 5], kv)  # blocks (1, 2), (3, 4)
    length, found = cache.lookup("a", [1, 2, 3, 4, 9])
    assert length == 4 and cache.hits == 1
    assert found[0][0][0, :, 0].tolist() == [0.0, 0.0, 1.0, 1.0]  # block 0 then block 1, along tokens
    assert cache.lookup("a", [1, 2, 3, 4])[0] == 2  # the last prompt token is always computed
    assert cache.lookup("b", [1, 2, 3, 4, 5]) == (0, None)  # per adapter
    cache.store("b", [7, 7, 8, 8], kv)  # 4 blocks held > 3: the least recently used (a's (3, 4)) goes
    assert cache.tokens == 6 and cache.lookup("a", [1, 2, 3, 4, 9])[0] == 2
    cache.forget("b")
    assert cache.lookup("b", [7, 7, 8, 8, 1]) == (0, None) and cache.tokens == 2


def _cache(rows: list[list[float]]) -> SimpleNamespace:
    """A one-layer stand-in for a DynamicCache: keys (rows, 1 head, length, 1) holding the given values."""
    keys = torch.tensor(rows)[:, None, :, None]
    return SimpleNamespace(layers=[SimpleNamespace(keys=keys, values=-keys)])


def test_batch_cache_joins_left_padded_and_trims_padding() -> None:
    batch = BatchCache()
    batch.join(_cache([[1.0, 2.0, 3.0]]), torch.ones(1, 3, dtype=torch.long), [0])
    # two newcomers of length 1, the second one dropped before joining (finished at its first token)
    batch.join(_cache([[7.0], [8.0]]), torch.ones(2, 1, dtype=torch.long), [0])
    assert batch.mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.cache.layers[0].keys[:, 0, :, 0].tolist() == [[1.0, 2.0, 3.0], [0.0, 0.0, 7.0]]
    assert torch.equal(batch.cache.layers[0].values, -batch.cache.layers[0].keys)
    assert batch.grow().tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    for layer in batch.cache.layers:  # the decoding step's new column
        layer.keys = torch.cat([layer.keys, torch.full((2, 1, 1, 1), 9.0)], dim=2)
        layer.values = torch.cat([layer.values, torch.full((2, 1, 1, 1), -9.0)], dim=2)
    batch.keep_rows([1])  # the long row leaves: the two columns that were padding for row 1 go too
    assert batch.mask.tolist() == [[1, 1]]
    assert batch.cache.layers[0].keys[:, 0, :, 0].tolist() == [[7.0, 9.0]]
    batch.keep_rows([])
    assert batch.cache is None and batch.mask is None


def test_stack_prefixes_left_pads_each_rows_cached_start() -> None:
    one = [(torch.ones(1, 2, 1), -torch.ones(1, 2, 1))]  # (heads, 2 tokens, dim)
    stacked = stack_prefixes([(2, one), (0, None)], past=3)
    assert stacked[0][0][:, 0, :, 0].tolist() == [[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    assert pad_left(torch.ones(1, 2), 2, 1).tolist() == [[0.0, 0.0, 1.0, 1.0]]
