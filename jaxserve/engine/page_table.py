"""The only owner of KV page indices: allocation, reference counts, prefix cache, freeing.

Page 0 is the null page: padding tokens write there and no sequence ever owns it.
A full page whose tokens are known is registered under a SHA-256 of its whole prefix
(chained page by page), so a later request with the same prefix shares it instead of
recomputing it. A hit is also checked against the page's own tokens and the digest of the
prefix before it, so no hash collision can hand one request another's KV. Each sequence's
chain is extended only by its new full pages, so the work per step does not grow with the
context. A shared page is only ever read: writes go to positions past the shared prefix,
which lie in pages of the request's own.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np

NULL_PAGE = 0
ROOT = b""  # the digest of the empty prefix


@dataclasses.dataclass(frozen=True)
class _Cached:
    """What a registered page holds: checked on every hit."""

    digest: bytes  # SHA-256 of the prefix up to and including this page
    parent: bytes  # the digest of the prefix before this page
    tokens: bytes  # this page's tokens (page_key)


class PageTable:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_cache: bool = True):
        if num_pages < 2:
            raise ValueError(f"{num_pages=} must be >= 2 (page 0 is reserved)")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_cache = enable_prefix_cache
        self._free: collections.deque[int] = collections.deque(range(1, num_pages))
        self._refs = np.zeros(num_pages, np.int32)
        self._tables: dict[str, list[int]] = {}
        # The tables as int32 arrays (step inputs): each a view of the first pages of a
        # buffer with room to grow, so a new page is one write, not a copy of the whole
        # table (about 12 us at 8k tokens on a CPU, for each sequence that fills a page).
        self._rows: dict[str, np.ndarray] = {}
        self._row_buffers: dict[str, np.ndarray] = {}
        self._chains: dict[str, tuple[int, bytes]] = {}  # seq -> (full pages hashed, digest)
        self._cached: dict[int, _Cached] = {}  # registered page -> what it holds
        self._page_of_hash: dict[bytes, int] = {}  # prefix digest -> page
        # Registered pages nobody references, oldest first: reusable, evicted on demand.
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()

    # ----- queries -------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - 1 - self.num_free_pages

    def pages(self, seq_id: str) -> list[int]:
        return self._tables.get(seq_id, [])

    def row(self, seq_id: str) -> np.ndarray:
        """seq_id's pages as an int32 array (kept up to date: no conversion per step)."""
        return self._rows[seq_id]

    def rows(self, seq_ids: Sequence[str]) -> list[np.ndarray]:
        """`row` of each of seq_ids."""
        return [self._rows[seq_id] for seq_id in seq_ids]

    def pages_needed(self, seq_id: str, num_tokens: int) -> int:
        have = len(self._tables.get(seq_id, ()))
        return max(0, -(-num_tokens // self.page_size) - have)

    def slots(self, seq_id: str, start: int, stop: int) -> np.ndarray:
        """Cache slots (page * page_size + offset) of positions [start, stop)."""
        pos = np.arange(start, stop)
        return cache_slots(self._rows[seq_id][pos // self.page_size], pos, self.page_size)

    # ----- lifecycle -----------------------------------------------------------------
    def admit(self, seq_id: str, token_ids: Sequence[int], use_cache: bool = True) -> int:
        """Start a table for seq_id, sharing cached full pages of its prefix.

        Returns how many tokens are already in the cache. At least one token is always
        left to compute, so the request produces logits.
        """
        if seq_id in self._tables:
            raise ValueError(f"{seq_id=} already has a page table")
        shared, chain = self._cached_prefix(token_ids) if use_cache else ([], ROOT)
        for page in shared:
            self._take(page)
        self._tables[seq_id] = shared
        self._row_buffers[seq_id] = np.zeros(max(2 * len(shared), 16), np.int32)
        self._set_row(seq_id)
        self._chains[seq_id] = (len(shared), chain)
        return len(shared) * self.page_size

    def num_cached_tokens(self, token_ids: Sequence[int]) -> int:
        """Tokens of this prefix that `admit` would find in the cache (nothing is taken)."""
        return len(self._cached_prefix(token_ids)[0]) * self.page_size

    def ensure(self, seq_id: str, num_tokens: int) -> bool:
        """Grow seq_id's table to hold num_tokens. All or nothing: False if pages run out."""
        need = self.pages_needed(seq_id, num_tokens)
        if need == 0:  # most steps of a decoding sequence
            return True
        if need > self.num_free_pages:
            return False
        table = self._tables[seq_id]
        for _ in range(need):
            page = self._free.popleft() if self._free else self._evict()
            self._refs[page] = 1
            table.append(page)
        self._set_row(seq_id, grown=need)
        return True

    def may_register(self, seq_id: str, num_computed: int) -> bool:
        """Whether `register` could offer a page: num_computed reaches past the pages of
        seq_id already offered (most decode steps fill no page)."""
        return self.enable_prefix_cache and \
            num_computed // self.page_size > self._chains[seq_id][0]

    def register(self, seq_id: str, token_ids: Sequence[int], num_computed: int) -> None:
        """Offer seq_id's full pages below num_computed (tokens known) to the prefix cache."""
        if not self.enable_prefix_cache:
            return
        full = min(num_computed, len(token_ids)) // self.page_size
        done, h = self._chains[seq_id]
        if full <= done:  # no page filled since the last call
            return
        table = self._tables[seq_id]
        # the new pages' keys from one conversion (a prompt's 32 pages at once: 0.2x the
        # time of one conversion a page)
        keys = page_key(token_ids[done * self.page_size:full * self.page_size])
        width = len(keys) // (full - done)
        for i in range(done, full):
            tokens = keys[(i - done) * width:(i - done + 1) * width]
            parent, h = h, _chain(h, tokens)
            page = table[i]
            if page in self._cached or h in self._page_of_hash:
                continue
            self._cached[page] = _Cached(h, parent, tokens)
            self._page_of_hash[h] = page
        self._chains[seq_id] = (full, h)

    def truncate(self, seq_id: str, num_tokens: int) -> None:
        """Give back seq_id's pages past the first num_tokens tokens (rejected speculative
        tokens). Those pages hold no known token, so none is in the prefix cache."""
        table = self._tables[seq_id]
        keep = -(-num_tokens // self.page_size)
        if keep >= len(table):
            return
        for page in table[keep:]:
            assert page not in self._cached, "a registered page holds known tokens"
            self._refs[page] -= 1
            if self._refs[page] == 0:
                self._free.append(page)
        del table[keep:]
        self._set_row(seq_id, grown=0)

    def free(self, seq_id: str) -> None:
        """Drop seq_id's references; unshared pages go back to the pool."""
        self._chains.pop(seq_id, None)
        self._rows.pop(seq_id, None)
        self._row_buffers.pop(seq_id, None)
        for page in reversed(self._tables.pop(seq_id, [])):
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._cached:
                    self._evictable[page] = None
                else:
                    self._free.append(page)

    def forget_cached(self) -> None:
        """Drop the whole prefix cache: after a step failed, which registered pages its
        writes reached is unknown. Pages in use stay with their sequences, unshared from now
        on; registered pages nobody uses go back to the pool."""
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._cached.clear()
        self._page_of_hash.clear()

    # ----- internals -----------------------------------------------------------------
    def _set_row(self, seq_id: str, grown: int | None = None) -> None:
        """Bring seq_id's row up to its table, whose last `grown` pages are new (None: all
        of them): a new view object, so a caller holding the old one sees it changed."""
        table, buffer = self._tables[seq_id], self._row_buffers[seq_id]
        n = len(table)
        if n > len(buffer):
            buffer = np.zeros(max(2 * len(buffer), n), np.int32)
            self._row_buffers[seq_id] = buffer
            grown = None
        start = 0 if grown is None else n - grown
        buffer[start:n] = table[start:]
        self._rows[seq_id] = buffer[:n]

    def _cached_prefix(self, token_ids: Sequence[int]) -> tuple[list[int], bytes]:
        """Cached pages of the prefix's full pages (leaving at least one token to compute),
        and the chained digest of the last of them."""
        pages: list[int] = []
        chain = ROOT
        if not self.enable_prefix_cache:
            return pages, chain
        ps = self.page_size
        for i in range((len(token_ids) - 1) // ps):
            tokens = page_key(token_ids[i * ps:(i + 1) * ps])
            h = _chain(chain, tokens)
            page = self._page_of_hash.get(h)
            if page is None:
                break
            held = self._cached[page]
            if held.tokens != tokens or held.parent != chain:  # a collision: never share
                break
            pages.append(page)
            chain = h
        return pages, chain

    def _take(self, page: int) -> None:
        if self._refs[page] == 0:
            del self._evictable[page]
        self._refs[page] += 1

    def _evict(self) -> int:
        page, _ = self._evictable.popitem(last=False)
        del self._page_of_hash[self._cached.pop(page).digest]
        return page

    def check_integrity(self) -> None:
        """Raise AssertionError if any invariant of the pool is broken."""
        counts = np.zeros(self.num_pages, np.int32)
        for seq_id, table in self._tables.items():
            assert len(set(table)) == len(table), f"{seq_id=} holds a page twice: {table}"
            for page in table:
                counts[page] += 1
        assert counts[NULL_PAGE] == 0 and self._refs[NULL_PAGE] == 0, "null page in use"
        assert np.array_equal(counts, self._refs), "reference counts disagree with the tables"
        free = list(self._free)
        assert len(set(free)) == len(free), "a page is on the free list twice"
        free_set, evictable = set(free), set(self._evictable)
        used = {p for p in range(self.num_pages) if self._refs[p] > 0}
        assert not (free_set & evictable), "a page is both free and evictable"
        assert not (used & (free_set | evictable)), "a page in use is also free"
        assert used | free_set | evictable == set(range(1, self.num_pages)), "a page is lost"
        assert all(p in self._cached for p in evictable), "evictable page has no hash"
        assert all(self._page_of_hash[c.digest] == p for p, c in self._cached.items()), \
            "prefix hash maps disagree"
        assert len(self._page_of_hash) == len(self._cached), "prefix hash maps disagree"
        assert set(self._chains) == set(self._tables), "hash chains and tables disagree"
        assert all(self._rows[s].tolist() == t for s, t in self._tables.items()) \
            and set(self._rows) == set(self._tables), "table arrays disagree with the tables"
        assert all(n <= len(self._tables[s]) for s, (n, _) in self._chains.items()), \
            "a hash chain covers pages the sequence does not hold"


def cache_slots(pages: np.ndarray, positions: np.ndarray, page_size: int) -> np.ndarray:
    """The cache slot (page * page_size + offset) of each position, given its page."""
    return pages * page_size + positions % page_size


def page_key(token_ids: Sequence[int]) -> bytes:
    """Token ids as the bytes a page is hashed and checked by (int64 each)."""
    return np.asarray(token_ids, np.int64).tobytes()


def _chain(prefix: bytes, page_tokens: bytes) -> bytes:
    """The SHA-256 of a prefix (given by its digest) extended by one full page of tokens
    (page_key)."""
    return hashlib.sha256(prefix + page_tokens).digest()
