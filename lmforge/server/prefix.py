"""The server's prompt-prefix KV cache: blocks of BLOCK positions' K and V, keyed by tokens.

A block holds every layer's K and V for BLOCK consecutive positions, (2 * n_layers, kv_heads,
BLOCK, head_dim), and is found by its parent block and its own tokens: a trie whose nodes live in
one dict keyed by (parent id, the block's tokens as a tuple). A lookup compares the tokens
themselves, so two prompts share a block only when every token before and in it is the same (a
bare hash could be forced to collide by a client, which would hand it another user's cache).

Blocks are kept in least-recently-used order within a byte budget. A lookup or insert touches the
blocks of its path deepest first, so a parent is always more recent than its children: the least
recent block is a leaf, and eviction never strands a child.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

BLOCK = 32  # positions per block: a prompt reuses whole blocks only


@dataclass(eq=False)
class Block:
    """One block: its key in the trie, its K/V (2 * n_layers, kv_heads, BLOCK, head_dim), its children."""

    id: int
    key: tuple[int, tuple[int, ...]]  # (parent block's id or 0 for the root, the block's tokens)
    kv: np.ndarray
    parent: Block | None = None
    children: int = 0
    nbytes: int = field(init=False)

    def __post_init__(self):
        self.nbytes = self.kv.nbytes


class PrefixStore:
    """KV blocks of token prefixes, LRU within `budget_bytes` (see the module docstring)."""

    def __init__(self, budget_bytes: int, block: int = BLOCK):
        self.budget = budget_bytes
        self.block = block
        self.nodes: dict[tuple[int, tuple[int, ...]], Block] = {}
        self.lru: OrderedDict[int, Block] = OrderedDict()  # least recent first
        self.nbytes = 0
        self.version = 0  # bumped whenever blocks come or go: a cached `match` is stale
        self._ids = itertools.count(1)

    def _path(self, tokens: Sequence[int]) -> list[Block]:
        """The stored blocks along `tokens`' whole blocks, from the first, as far as they go."""
        path: list[Block] = []
        parent = 0
        for start in range(0, len(tokens) - self.block + 1, self.block):
            node = self.nodes.get((parent, tuple(tokens[start : start + self.block])))
            if node is None:
                break
            path.append(node)
            parent = node.id
        return path

    def _touch(self, path: list[Block]) -> None:
        for node in reversed(path):  # deepest first: parents end up more recent than children
            self.lru.move_to_end(node.id)

    def match(self, tokens: Sequence[int]) -> int:
        """How many leading tokens of `tokens` the store holds (whole blocks); touches nothing."""
        return len(self._path(tokens)) * self.block

    def lookup(self, tokens: Sequence[int]) -> tuple[int, list[np.ndarray]]:
        """(n, blocks): the longest run of whole blocks of `tokens` stored, as n tokens and the
        blocks' K/V arrays in order; marks them most recently used."""
        path = self._path(tokens)
        self._touch(path)
        return len(path) * self.block, [node.kv for node in path]

    def insert(self, tokens: Sequence[int], read: Callable[[int, int], np.ndarray]) -> int:
        """Store the whole blocks of `tokens` not stored yet; `read(start, stop)` returns a copy of
        positions start..stop-1 as (2 * n_layers, kv_heads, stop - start, head_dim). A prefix
        longer than the budget is stored up to what the budget holds. Returns the blocks added."""
        path = self._path(tokens)
        self._touch(path)  # the shared part is most recent: eviction takes other prompts' leaves first
        added = 0
        for start in range(len(path) * self.block, len(tokens) - self.block + 1, self.block):
            kv = read(start, start + self.block)
            if (len(path) + 1) * kv.nbytes > self.budget:
                break  # the path alone would overflow the budget: it would evict itself
            self._evict(self.budget - kv.nbytes)
            parent = path[-1] if path else None
            node = Block(next(self._ids), (parent.id if parent else 0, tuple(tokens[start : start + self.block])), kv)
            node.parent = parent
            if parent is not None:
                parent.children += 1
            self.nodes[node.key] = node
            self.lru[node.id] = node
            self.nbytes += node.nbytes
            path.append(node)
            added += 1
        if added:
            self._touch(path)
            self.version += 1
        return added

    def _evict(self, limit: int) -> None:
        """Drop least recently used blocks (leaves, see the module docstring) until at most
        `limit` bytes are held."""
        while self.nbytes > limit:
            _, node = self.lru.popitem(last=False)
            assert node.children == 0, "the least recently used block has children"
            del self.nodes[node.key]
            if node.parent is not None:
                node.parent.children -= 1
            self.nbytes -= node.nbytes
            self.version += 1

    def clear(self) -> None:
        """Drop every block."""
        self._evict(0)
