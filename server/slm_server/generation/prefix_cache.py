"""Prefix caching: the KV cache of prompt prefixes, kept for the prompts that begin the same way.

Chat requests to one deployment mostly begin with the same tokens: a system prompt, a few-shot
preamble, the conversation so far. After a prompt is prefilled, the KV cache of its first whole
blocks (`block` tokens each, all but its last token) is kept here, in memory, up to a byte budget,
least recently used first out. A later prompt that begins with the same blocks starts from a copy
of that cache, and only its other tokens go through the model (vLLM's automatic prefix caching,
without paged blocks: an entry holds one prompt's prefix, and any shorter run of whole blocks of it
serves too).

Keys: a chain of hashes, one per block boundary (the hash of a boundary covers every token before
it), so a lookup walks the prompt's blocks once. A hit is checked against the entry's own tokens, so
a hash collision cannot give a prompt another prompt's cache.

Only models whose every attention layer keeps its whole past can use it (`DynamicLayer`s): a
sliding-window layer keeps only the last window of a prompt, which a shorter prefix cannot be cut
from. `slm_server.generation.scheduler` asks whether the model qualifies (`cache_support`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass(eq=False)
class _Entry:
    ids: list[int]  # the prefix's tokens (a whole number of blocks)
    layers: list[tuple[Any, Any]]  # per layer (keys, values), each (1, heads, len(ids), head dim)
    nbytes: int
    keys: list[int]  # its boundaries' hashes


class PrefixCache:
    """Prompt-prefix KV caches up to `capacity_bytes`, least recently used out first. Used from the
    scheduler's thread; the counters are read from others (a scrape)."""

    def __init__(self, capacity_bytes: int, block: int = 16):
        self.capacity_bytes = capacity_bytes
        self.block = block
        self.queried_tokens = 0  # prompt tokens looked up (all but each prompt's last)
        self.hit_tokens = 0  # of them, found here
        self.nbytes = 0
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # by id(), least recently used first
        self._index: dict[int, list[_Entry]] = {}  # boundary hash -> the entries that hold that prefix
        self._lock = threading.Lock()  # for the readers of the counters

    def _boundaries(self, ids: list[int], limit: int) -> list[int]:
        """The hash of each block boundary of `ids` up to `limit` tokens."""
        hashes, running = [], 0
        for end in range(self.block, limit + 1, self.block):
            running = hash((running, tuple(ids[end - self.block : end])))
            hashes.append(running)
        return hashes

    def lookup(self, ids: list[int]) -> tuple[int, list[tuple[Any, Any]]]:
        """The longest cached prefix of `ids` that leaves at least its last token to feed: (its length,
        per layer its (keys, values)); (0, []) when none."""
        usable = len(ids) - 1
        found, found_entry = 0, None
        for boundary, key in enumerate(self._boundaries(ids, usable), start=1):
            holders = self._index.get(key)
            if not holders:
                break  # an entry with a longer prefix holds this boundary too
            found, found_entry = boundary * self.block, holders[-1]
        if found_entry is not None and found_entry.ids[:found] != ids[:found]:  # a hash collision: a miss
            found, found_entry = 0, None
        with self._lock:
            self.queried_tokens += max(usable, 0)
            self.hit_tokens += found
        if found_entry is None:
            return 0, []
        self._entries.move_to_end(id(found_entry))
        return found, [(k[:, :, :found], v[:, :, :found]) for k, v in found_entry.layers]

    def insert(self, ids: list[int], layers: list[tuple[Any, Any]]) -> None:
        """Keep the KV cache of `ids`' whole blocks but its last token: `layers`, per layer (keys,
        values) of shape (1, heads, n, head dim) with n >= that many positions (copied here)."""
        length = (len(ids) - 1) // self.block * self.block
        if length == 0:
            return
        prefix = ids[:length]
        keys = self._boundaries(prefix, length)
        for known in self._index.get(keys[-1], []):
            if len(known.ids) == length and known.ids == prefix:
                self._entries.move_to_end(id(known))  # already here: only fresher
                return
        nbytes = sum(k[:, :, :length].nbytes + v[:, :, :length].nbytes for k, v in layers)
        if nbytes > self.capacity_bytes:
            return
        while self.nbytes + nbytes > self.capacity_bytes:
            self._evict(next(iter(self._entries.values())))
        entry = _Entry(prefix, [(k[:, :, :length].clone(), v[:, :, :length].clone()) for k, v in layers], nbytes, keys)
        for key in keys:
            self._index.setdefault(key, []).append(entry)
        self._entries[id(entry)] = entry
        with self._lock:
            self.nbytes += nbytes

    def _evict(self, entry: _Entry) -> None:
        del self._entries[id(entry)]
        for key in entry.keys:
            holders = self._index[key]
            holders.remove(entry)
            if not holders:  # the other entries that begin the same way keep the boundary
                del self._index[key]
        with self._lock:
            self.nbytes -= entry.nbytes

    def stats(self) -> tuple[int, int, int]:
        """(prompt tokens looked up, found, bytes held)."""
        with self._lock:
            return self.queried_tokens, self.hit_tokens, self.nbytes
