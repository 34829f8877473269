"""The page allocator: free list, reference counts, prefix sharing, eviction, integrity."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxserve.engine.page_table import NULL_PAGE, PageTable


def test_allocate_and_free_returns_every_page():
    pt = PageTable(num_pages=9, page_size=4)
    pt.admit("a", [1, 2, 3])
    assert pt.ensure("a", 10)  # 3 pages
    assert len(pt.pages("a")) == 3 and NULL_PAGE not in pt.pages("a")
    assert pt.num_free_pages == 5
    assert not pt.ensure("a", 40)  # would need 10 pages: nothing taken
    assert len(pt.pages("a")) == 3 and pt.num_free_pages == 5
    pt.check_integrity()
    pt.free("a")
    assert pt.num_free_pages == 8 and pt.num_used_pages == 0
    pt.check_integrity()


def test_slots_follow_the_table():
    pt = PageTable(num_pages=6, page_size=4)
    pt.admit("a", [0])
    pt.ensure("a", 6)
    p0, p1 = pt.pages("a")
    assert pt.slots("a", 2, 6).tolist() == [p0 * 4 + 2, p0 * 4 + 3, p1 * 4, p1 * 4 + 1]


def test_a_row_follows_its_table_page_by_page_past_its_buffer_and_after_truncation():
    """The step inputs' row of a sequence (a view of a buffer with room to grow) equals its
    table after every change, and is a new object whenever the table changed (the batch
    builder copies a row again only then)."""
    pt = PageTable(num_pages=200, page_size=2)
    pt.admit("b", [9])
    pt.ensure("b", 2 * 20)  # another sequence's pages between a's
    pt.admit("a", [1])
    before = pt.row("a")
    for n in range(1, 101):  # past the row's first buffers (16, 32, 64 pages)
        assert pt.ensure("a", 2 * n)
        row = pt.row("a")
        assert row.tolist() == pt.pages("a") and row.dtype.name == "int32"
        assert row is not before
        before = row
        assert pt.ensure("a", 2 * n) and pt.row("a") is row  # nothing to grow: the same
    pt.truncate("a", 2 * 30)
    assert pt.row("a").tolist() == pt.pages("a") and len(pt.pages("a")) == 30
    assert pt.ensure("a", 2 * 40)
    assert pt.row("a").tolist() == pt.pages("a") and len(set(pt.pages("a"))) == 40
    assert pt.row("b").tolist() == pt.pages("b")
    pt.check_integrity()


def test_prefix_pages_are_shared_and_outlive_their_first_owner():
    pt = PageTable(num_pages=10, page_size=4)
    tokens = list(range(11))  # two full pages + 3 tokens
    pt.admit("a", tokens)
    pt.ensure("a", 11)
    pt.register("a", tokens, 11)
    assert pt.admit("b", tokens + [99]) == 8  # both full pages found
    assert pt.pages("b") == pt.pages("a")[:2]
    pt.ensure("b", 12)
    assert pt.pages("b")[2] != pt.pages("a")[2]  # the partial page is never shared
    pt.check_integrity()
    pt.free("a")
    pt.check_integrity()
    assert pt.admit("c", tokens) == 8  # still cached through b
    pt.free("b")
    pt.free("c")
    assert pt.num_used_pages == 0
    assert pt.admit("d", tokens) == 8  # unreferenced, but still cached (evictable)
    pt.free("d")
    pt.check_integrity()


def test_forgetting_the_cache_frees_unused_pages_and_shares_nothing_more():
    pt = PageTable(num_pages=10, page_size=4)
    tokens = list(range(11))
    for seq in ("a", "b"):
        pt.admit(seq, tokens if seq == "a" else [50 + t for t in tokens])
        pt.ensure(seq, 11)
        pt.register(seq, tokens if seq == "a" else [50 + t for t in tokens], 11)
    pt.free("b")  # its two registered pages: unreferenced, still cached
    assert pt.num_free_pages == 9 - 3 and pt.num_cached_tokens([50 + t for t in tokens]) == 8
    pt.forget_cached()
    pt.check_integrity()
    assert pt.num_free_pages == 9 - 3  # b's pages are plainly free now
    assert pt.admit("c", tokens) == 0  # a's registered pages are no longer shared
    assert pt.num_cached_tokens([50 + t for t in tokens]) == 0
    pt.ensure("c", 11)
    pt.free("a")
    pt.free("c")
    pt.check_integrity()
    assert pt.num_used_pages == 0


def test_at_least_one_token_is_left_to_compute():
    pt = PageTable(num_pages=10, page_size=4)
    tokens = list(range(8))
    pt.admit("a", tokens)
    pt.ensure("a", 8)
    pt.register("a", tokens, 8)
    assert pt.admit("b", tokens) == 4  # not 8: the last token must produce logits
    assert pt.admit("c", tokens, use_cache=False) == 0


def test_cached_pages_are_evicted_when_the_pool_runs_out():
    pt = PageTable(num_pages=5, page_size=2)
    pt.admit("a", [1, 2, 3, 4])
    pt.ensure("a", 4)
    pt.register("a", [1, 2, 3, 4], 4)
    pt.free("a")
    assert pt.num_free_pages == 4
    pt.admit("b", [7])
    assert pt.ensure("b", 8)  # takes every page, evicting the cached ones
    assert pt.admit("c", [1, 2, 3, 4, 5]) == 0
    pt.check_integrity()


def test_integrity_check_catches_corruption():
    pt = PageTable(num_pages=6, page_size=4)
    pt.admit("a", [1])
    pt.ensure("a", 8)
    pt._refs[pt.pages("a")[0]] += 1
    with pytest.raises(AssertionError, match="reference counts"):
        pt.check_integrity()
    pt._refs[pt.pages("a")[0]] -= 1
    pt._free.append(pt.pages("a")[1])
    with pytest.raises(AssertionError):
        pt.check_integrity()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["admit", "ensure", "register", "free"]),
                          st.integers(0, 5), st.integers(1, 30), st.integers(0, 2)),
                max_size=80))
def test_random_operations_keep_the_invariants(ops):
    pt = PageTable(num_pages=12, page_size=3)
    seqs: dict[str, list[int]] = {}
    for op, who, n, prefix in ops:
        seq = f"s{who}"
        tokens = [prefix] * 6 + list(range(n))  # shared prefixes between sequences
        if op == "admit" and seq not in seqs:
            cached = pt.admit(seq, tokens)
            assert cached % 3 == 0 and cached < len(tokens)
            seqs[seq] = tokens
        elif op == "ensure" and seq in seqs:
            before = list(pt.pages(seq))
            free = pt.num_free_pages
            ok = pt.ensure(seq, min(n, len(seqs[seq])))
            assert pt.pages(seq)[: len(before)] == before
            if not ok:
                assert pt.pages(seq) == before and pt.num_free_pages == free
        elif op == "register" and seq in seqs:
            covered = len(pt.pages(seq)) * 3
            pt.register(seq, seqs[seq], min(covered, n))
        elif op == "free" and seq in seqs:
            pt.free(seq)
            del seqs[seq]
        pt.check_integrity()
    for seq in list(seqs):
        pt.free(seq)
    pt.check_integrity()
    assert pt.num_used_pages == 0 and pt.num_free_pages == 11


def test_registering_step_by_step_finds_the_same_prefix_as_all_at_once():
    tokens = list(range(100, 139))  # 9 full pages of 4, and 3 tokens
    step = PageTable(num_pages=32, page_size=4)
    step.admit("a", tokens[:1])
    for n in range(1, len(tokens) + 1):  # one token more each step, as a decode runs
        step.ensure("a", n)
        step.register("a", tokens[:n], n)
    once = PageTable(num_pages=32, page_size=4)
    once.admit("a", tokens)
    once.ensure("a", len(tokens))
    once.register("a", tokens, len(tokens))
    for pt in (step, once):
        pt.check_integrity()
        assert pt.admit("b", tokens[:30] + [7]) == 28  # 7 cached full pages
        assert pt.pages("b") == pt.pages("a")[:7]
        # A prefix sharing the cache's first 3 pages extends that chain from there.
        pt.ensure("b", 31)
        pt.register("b", tokens[:30] + [7], 31)
        pt.check_integrity()
        assert pt.admit("c", tokens[:30] + [7, 8]) == 28


def test_a_request_token_view_reads_prompt_and_output_without_copying():
    from jaxserve.engine.request import Request, SamplingParams

    req = Request("r", [1, 2, 3], SamplingParams(), seed=0, arrival_time=0.0)
    req.output_ids += [4, 5]
    view = req.token_ids
    assert len(view) == 5 and list(view) == req.all_token_ids == [1, 2, 3, 4, 5]
    assert view[1:4] == [2, 3, 4] and view[3:] == [4, 5] and view[:2] == [1, 2]
    assert view[-1] == 5 and view[::2] == [1, 3, 5]
    req.output_ids.append(6)  # a view sees tokens appended after it was taken
    assert view[5] == 6


def test_prefixes_that_collide_under_pythons_hash_are_never_shared():
    # hash(-1) == hash(-2) in CPython, so (h, (-1, ...)) and (h, (-2, ...)) hash alike:
    # a cache keyed by Python's hash would hand b the KV of a's different prefix.
    pt = PageTable(num_pages=16, page_size=4)
    a, b = [-1, 5, 6, 7, 8], [-2, 5, 6, 7, 8]
    assert hash(tuple(a[:4])) == hash(tuple(b[:4]))
    pt.admit("a", a)
    pt.ensure("a", 5)
    pt.register("a", a, 5)
    assert pt.admit("b", b) == 0  # nothing shared
    assert pt.admit("c", a) == 4  # the same prefix still is
    pt.check_integrity()
