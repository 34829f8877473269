"""The step's host inputs for a mixed batch, field by field: a prefill chunk, a decode whose
input token is still on the device, a sequence verifying proposed tokens, and one whose
EOS and stop ids are banned until min_tokens."""

import numpy as np

from jaxserve.config import load_config
from jaxserve.engine import step_inputs
from jaxserve.engine.batch_builder import BatchBuilder
from jaxserve.engine.page_table import PageTable
from jaxserve.engine.request import Request, SamplingParams
from jaxserve.engine.scheduler import ScheduledSeq, SchedulerOutput

EOS = 2


def make(request_id, prompt_len, output=(), pending=0, draft=(), **params):
    req = Request(request_id, list(range(100, 100 + prompt_len)), SamplingParams(**params),
                  seed=1000 + prompt_len, arrival_time=0.0)
    req.output_ids = list(output)
    req.num_pending = pending
    req.draft = list(draft)
    return req


def test_mixed_batch_inputs():
    config = load_config("configs/smollm2-135m-cpu.yaml").replace(
        cache__page_size=4, cache__max_model_len=64, scheduler__max_num_seqs=8,
        scheduler__max_num_batched_tokens=16, speculative__method="ngram",
        speculative__num_tokens=2,
        runner__token_buckets=(16,), runner__seq_buckets=(8,))
    builder = BatchBuilder(config, num_shards=1, stages=1, eos_ids=[EOS])
    table = PageTable(num_pages=64, page_size=4)
    prefill = make("prefill", 10, temperature=0.5, top_k=7)                # chunk of 6
    decode = make("decode", 5, output=[7, 8], pending=1, top_p=0.9)        # token on device
    verify = make("verify", 6, output=[9], draft=[11, 12], logprobs=3)     # 1 known + 2 proposed
    banned = make("banned", 3, min_tokens=4, stop_token_ids=[5, 6])
    seqs = [ScheduledSeq(prefill, 0, 6, samples=False),
            ScheduledSeq(decode, 7, 1, samples=True),
            ScheduledSeq(verify, 6, 3, samples=True),
            ScheduledSeq(banned, 0, 3, samples=True)]
    for s in seqs:
        table.admit(s.request.request_id, s.request.token_ids, use_cache=False)
        assert table.ensure(s.request.request_id, s.start + s.num_tokens)
    mb = builder.micro_batch(SchedulerOutput(tuple(seqs), ()), [table],
                             prev_rows=[(decode, 0, 5)])
    h = mb.host.blocks[0][0]
    assert mb.host.layout.J == 3  # a verifying batch: the last known token + 2 proposed
    assert mb.rows == [(decode, 0, 1), (verify, 0, 2), (banned, 0, 3)]

    n = 6 + 1 + 3 + 3
    assert h.token_ids[:n].tolist() == [100, 101, 102, 103, 104, 105,   # prefill chunk
                                        0,                              # decode: on device
                                        9, 11, 12,                      # verify
                                        100, 101, 102]                  # banned
    assert h.prev_index[:n].tolist() == [-1] * 6 + [5] + [-1] * 6
    assert (h.prev_index[n:] == -1).all()
    assert h.positions[:n].tolist() == [0, 1, 2, 3, 4, 5, 7, 6, 7, 8, 0, 1, 2]
    assert (h.positions[n:] == -1).all()
    pages = {s.request.request_id: table.pages(s.request.request_id) for s in seqs}
    expected_slots = [pages[r][p // 4] * 4 + p % 4 for r, p in
                      [("prefill", i) for i in range(6)] + [("decode", 7)]
                      + [("verify", i) for i in (6, 7, 8)] + [("banned", i) for i in range(3)]]
    assert h.slot_mapping[:n].tolist() == expected_slots
    for row, s in enumerate(seqs):
        got = pages[s.request.request_id]
        assert h.page_tables[row, :len(got)].tolist() == got
    assert h.seq_lens[:4].tolist() == [6, 8, 9, 3]
    assert h.query_start[:6].tolist() == [0, 6, 7, 10, 13, 13]
    assert h.num_draft[:4].tolist() == [0, 0, 2, 0]
    assert h.logits_indices[:4].tolist() == [[5, 5, 5], [6, 6, 6], [7, 8, 9], [12, 12, 12]]
    # Penalty slots: one per request; proposed tokens count for no slot.
    slots = h.row_slots[:4].tolist()
    assert len(set(slots)) == 4 and (h.row_slots[4:] == 8).all()
    assert h.token_slot[:n].tolist() == ([slots[0]] * 6 + [slots[1]] + [slots[2], 8, 8]
                                         + [slots[3]] * 3)
    assert h.reset_slots[:4].tolist() == slots  # all four slots are new
    assert h.token_is_output[:n].tolist() == [0] * 6 + [1] + [1, 1, 1] + [0] * 3
    # Sampling parameters, with the padding rows neutral.
    np.testing.assert_allclose(h.temperature[:4], [0.5, 1, 1, 1])
    assert h.top_k[:4].tolist() == [7, -1, -1, -1]
    np.testing.assert_allclose(h.top_p[:5], [1, 0.9, 1, 1, 1], rtol=1e-6)
    assert h.seeds[:4].tolist() == [1010, 1005, 1006, 1003]
    assert h.num_logprobs[:5].tolist() == [-1, -1, 3, -1, -1]
    assert h.output_index[:4].tolist() == [0, 3, 1, 0]
    assert h.banned[3, :3].tolist() == [5, 6, EOS] and (h.banned[3, 3:] == -1).all()
    assert (h.banned[:3] == -1).all()


def test_min_tokens_bans_what_would_stop_the_request():
    """Until min_tokens, a request's stop ids and EOS are banned; with ignore_eos an EOS
    stops nothing, so it stays allowed."""
    config = load_config("configs/smollm2-135m-cpu.yaml").replace(
        cache__page_size=4, cache__max_model_len=64, scheduler__max_num_seqs=4,
        scheduler__max_num_batched_tokens=16, runner__token_buckets=(16,),
        runner__seq_buckets=(4,))
    builder = BatchBuilder(config, num_shards=1, stages=1, eos_ids=[EOS])
    table = PageTable(num_pages=16, page_size=4)
    reqs = [make("stops", 3, min_tokens=2, stop_token_ids=[5]),
            make("no-eos", 3, min_tokens=2, ignore_eos=True, stop_token_ids=[5]),
            make("no-eos-no-stops", 3, min_tokens=2, ignore_eos=True)]
    for req in reqs:
        table.admit(req.request_id, req.token_ids, use_cache=False)
        assert table.ensure(req.request_id, 3)
    seqs = tuple(ScheduledSeq(req, 0, 3, samples=True) for req in reqs)
    h = builder.micro_batch(SchedulerOutput(seqs, ()), [table], []).host.blocks[0][0]
    assert h.banned[0, :2].tolist() == [5, EOS]
    assert h.banned[1, 0] == 5 and (h.banned[1, 1:] == -1).all()
    assert (h.banned[2:] == -1).all()


def test_same_rows_again_copy_what_did_not_change():
    """Steps that run the same requests in the same rows copy their penalty slots, sampling
    parameters and unchanged page tables from the last micro-batch instead of gathering them
    again. Every field must equal a build from scratch, through a prefill, page tables that
    grow, input tokens on the device or already known, and a min_tokens ban that lifts."""
    config = load_config("configs/smollm2-135m-cpu.yaml").replace(
        cache__page_size=4, cache__max_model_len=64, scheduler__max_num_seqs=4,
        scheduler__max_num_batched_tokens=16,
        runner__token_buckets=(4, 16), runner__seq_buckets=(4,))
    builder = BatchBuilder(config, num_shards=1, stages=1, eos_ids=[EOS])
    gathered = []  # requests whose slot the builder looked up
    slot = builder.slot
    builder.slot = lambda req: (gathered.append(req.request_id), slot(req))[1]
    table = PageTable(num_pages=64, page_size=4)
    reqs = [make("a", 5, temperature=0.7, top_k=3), make("b", 3, min_tokens=2, stop_token_ids=[5]),
            make("c", 6, logprobs=2)]
    for req in reqs:
        table.admit(req.request_id, req.token_ids, use_cache=False)
    prev_rows = []
    for step in range(8):
        seqs = []
        for req in reqs:
            start = req.num_computed_tokens
            n = req.num_tokens - start
            assert table.ensure(req.request_id, start + n)
            req.num_computed_tokens += n
            seqs.append(ScheduledSeq(req, start, n, samples=True))
        sched = SchedulerOutput(tuple(seqs), ())
        gathered.clear()
        mb = builder.micro_batch(sched, [table], prev_rows)
        assert gathered == ([] if step else ["a", "b", "c"])  # copied after the first step
        builder._last = [None]
        scratch = builder.micro_batch(sched, [table], prev_rows)
        for name, _, _ in step_inputs._FIELDS:
            if step == 0 and name == "reset_slots":  # new slots only in the first build
                continue
            np.testing.assert_array_equal(getattr(mb.host.blocks[0][0], name),
                                          getattr(scratch.host.blocks[0][0], name),
                                          err_msg=f"step {step}: {name}")
        # Each sampled token: on odd steps still on the device, on even steps read back.
        for req in reqs:
            if req.num_pending:
                req.num_pending = 0
                req.output_ids.append(50 + step)
            if step % 2:
                req.num_pending = 1
            else:
                req.output_ids.append(60 + step)
        prev_rows = mb.rows
    assert len(table.pages("a")) > 2  # the tables grew on the way
    gathered.clear()
    fewer = builder.micro_batch(SchedulerOutput(tuple(seqs[:2]), ()), [table], prev_rows)
    assert gathered == ["a", "b"]  # other rows: gathered again, same slots
    assert (fewer.host.blocks[0][0].row_slots[:2].tolist()
            == mb.host.blocks[0][0].row_slots[:2].tolist())


def test_buffers_come_round_again_reset_to_padding():
    """Each layout's input buffers are reused in turn: none again while a step may still read
    it (the engine keeps one in flight, a pipeline's micro-batches live `stages` ticks),
    and a reused one holds nothing of its last batch, only padding."""
    config = load_config("configs/smollm2-135m-cpu.yaml").replace(
        cache__page_size=4, cache__max_model_len=64, scheduler__max_num_seqs=4,
        scheduler__max_num_batched_tokens=16,
        runner__token_buckets=(16,), runner__seq_buckets=(4,))
    table = PageTable(num_pages=64, page_size=4)
    reqs = [make(name, 4 + i, temperature=0.5, min_tokens=3, stop_token_ids=[7])
            for i, name in enumerate("abc")]
    for req in reqs:
        table.admit(req.request_id, req.token_ids, use_cache=False)
        assert table.ensure(req.request_id, req.num_tokens)
    full = SchedulerOutput(tuple(ScheduledSeq(r, 0, r.num_tokens, samples=True)
                                 for r in reqs), ())
    one = SchedulerOutput((ScheduledSeq(reqs[0], 0, reqs[0].num_tokens, samples=True),), ())
    for stages in (1, 3):
        depth = stages + 2
        builder = BatchBuilder(config, num_shards=1, stages=stages, eos_ids=[EOS])
        batches = [builder.micro_batch(full, [table], [])]
        batches += [builder.micro_batch(one, [table], []) for _ in range(2 * depth)]
        buffers = [mb.host.buffer for mb in batches]
        for i, buf in enumerate(buffers):  # distinct within any `depth` builds in a row
            assert not any(buf is other for other in buffers[max(0, i - depth + 1):i])
        assert buffers[depth] is buffers[0]  # the full batch's buffer, come round again
        # The same batch built by a new builder in new buffers (twice: its first build
        # also resets the request's new penalty slot).
        fresh = BatchBuilder(config, num_shards=1, stages=stages, eos_ids=[EOS])
        fresh.micro_batch(one, [table], [])
        expected = fresh.micro_batch(one, [table], []).host.blocks[0][0]
        for name, _, _ in step_inputs._FIELDS:
            np.testing.assert_array_equal(getattr(batches[depth].host.blocks[0][0], name),
                                          getattr(expected, name),
                                          err_msg=f"stages={stages}: {name}")
