"""Keys and values: the prefix cache of prompt blocks, and the running batch's KV cache that newcomers join
and finished rows leave.

The running batch is one transformers ``DynamicCache`` of shape ``(rows, heads, length, dim)`` per layer with a
2-D attention mask ``(rows, length)``: rows are left-padded to a common length, the mask marks the padding, and
each row keeps its own position ids, so a row computes what it would compute alone.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

#: keys and values of one cached piece, per layer: (keys, values), each ``(heads, tokens, dim)`` for a block
LayerKV = list[tuple[Tensor, Tensor]]


def pad_left(t: Tensor, n: int, dim: int) -> Tensor:
    """``n`` zeros in front of dimension ``dim`` (the sequence dimension)."""
    if n == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [n, 0]
    return F.pad(t, pad)


def new_cache(model_config: Any, layers: LayerKV | None = None) -> Any:
    """A ``DynamicCache`` holding ``layers`` (keys, values) ``(rows, heads, length, dim)``, or empty."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model_config)
    for layer, (keys, values) in zip(cache.layers, layers or []):
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
    return cache


def check_cache_layout(model_config: Any) -> bool:
    """True when every cache layer of the model is a plain full-attention ``DynamicLayer`` (the only kind whose
    rows can be padded and concatenated)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model_config).layers)


def stack_prefixes(hits: list[tuple[int, LayerKV | None]], past: int) -> LayerKV:
    """Per layer, the rows' cached prefixes (``(P_i, kv)`` from `PrefixCache.lookup`) left-padded to ``past``
    tokens and stacked ``(rows, heads, past, dim)``."""
    some = next(kv for _, kv in hits if kv is not None)
    layers = []
    for layer, (k0, _) in enumerate(some):
        empty = k0.new_zeros(k0.shape[0], past, k0.shape[2])
        layers.append(tuple(torch.stack([empty if kv is None else pad_left(kv[layer][part], past - p, 1)
                                         for p, kv in hits]) for part in (0, 1)))
    return layers


class _Block:
    """A cached block of prompt tokens: its keys and values in every layer, and the blocks that may follow."""

    __slots__ = ("tokens", "kv", "children", "parent")

    def __init__(self, tokens: tuple[int, ...], kv: LayerKV, parent: dict) -> None:
        self.tokens, self.kv, self.parent = tokens, kv, parent
        self.children: dict[tuple[int, ...], _Block] = {}


class PrefixCache:
    """Keys and values of prompt blocks already prefilled, per adapter, as vLLM's automatic prefix caching: a
    prompt that starts with cached blocks (the chat template's system prompt, a shared preamble) prefills only
    the rest. Per adapter, since an adapter changes every key and value after the first layer.

    A trie of ``block``-token blocks (exact token comparison, no hashes); beyond ``max_tokens`` the least
    recently used blocks are dropped with the blocks that follow them. ``hits`` counts lookups that found at
    least one block.
    """

    def __init__(self, block: int, max_tokens: int) -> None:
        self.block, self.max_blocks = block, max_tokens // block
        self.roots: dict[str | None, dict[tuple[int, ...], _Block]] = {}
        self._lru: OrderedDict[int, _Block] = OrderedDict()
        self.hits = 0

    def lookup(self, adapter: str | None, ids: list[int]) -> tuple[int, LayerKV | None]:
        """``(P, keys/values (heads, P, dim) per layer)`` of the longest cached start of ``ids``; P < len(ids)
        (the last prompt token is always computed: its logits give the first new token)."""
        children, found = self.roots.get(adapter), []
        for b in range((len(ids) - 1) // self.block):
            node = children.get(tuple(ids[b * self.block:(b + 1) * self.block])) if children is not None else None
            if node is None:
                break
            found.append(node)
            self._lru.move_to_end(id(node))
            children = node.children
        if not found:
            return 0, None
        self.hits += 1
        layers = range(len(found[0].kv))
        return len(found) * self.block, [(torch.cat([n.kv[i][0] for n in found], dim=1),
                                          torch.cat([n.kv[i][1] for n in found], dim=1)) for i in layers]

    def store(self, adapter: str | None, ids: list[int], block_kv: Callable[[int], LayerKV]) -> None:
        """Add the full blocks of ``ids`` missing from the trie; ``block_kv(b)`` gives block b's keys/values."""
        if self.max_blocks < 1:
            return
        children = self.roots.setdefault(adapter, {})
        for b in range(len(ids) // self.block):
            tokens = tuple(ids[b * self.block:(b + 1) * self.block])
            node = children.get(tokens)
            if node is None:
                node = children[tokens] = _Block(tokens, block_kv(b), children)
            self._lru[id(node)] = node
            self._lru.move_to_end(id(node))
            children = node.children
        while len(self._lru) > self.max_blocks:
            _, oldest = self._lru.popitem(last=False)
            self._drop(oldest)

    def forget(self, adapter: str | None) -> None:
        """Drop every block of ``adapter`` (unloaded: its keys and values may not come back the same)."""
        for node in list(self.roots.pop(adapter, {}).values()):
            self._drop(node)

    def _drop(self, node: _Block) -> None:
        node.parent.pop(node.tokens, None)
        self._lru.pop(id(node), None)
        for child in list(node.children.values()):
            self._drop(child)

    @property
    def tokens(self) -> int:
        return len(self._lru) * self.block


class BatchCache:
    """The running batch's ``DynamicCache`` and attention mask ``(rows, length)`` (1: a real token, 0: left
    padding); row order is the engine's row order."""

    def __init__(self) -> None:
        self.cache: Any = None
        self.mask: Tensor | None = None

    def join(self, cache: Any, mask: Tensor, keep: list[int]) -> None:
        """Append rows ``keep`` of a prefilled ``cache`` / ``mask`` to the batch, left-padding the shorter side."""
        if len(keep) < mask.shape[0]:
            index = torch.tensor(keep, device=mask.device)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
            mask = mask.index_select(0, index)
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        old, new = self.mask.shape[1], mask.shape[1]
        length = max(old, new)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([pad_left(mine.keys, length - old, 2), pad_left(theirs.keys, length - new, 2)])
            mine.values = torch.cat([pad_left(mine.values, length - old, 2), pad_left(theirs.values, length - new, 2)])
        self.mask = torch.cat([pad_left(self.mask, length - old, 1), pad_left(mask, length - new, 1)])

    def grow(self) -> Tensor:
        """One more (real) column for the token every row feeds next; returns the new mask."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        return self.mask

    def keep_rows(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (in that order) and trim columns that became padding in every row."""
        if not keep:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int(mask.any(0).long().argmax())  # columns before it are padding in every row left
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]

    def clear(self) -> None:
        self.cache, self.mask = None, None
