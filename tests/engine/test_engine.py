"""The engine on the real demo model: batching invariance under chunked prefill and
preemption, pages back in the pool, no compilation after warm-up, in-place KV cache,
stop conditions, aborts, seeds and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.engine.engine import Engine
from jaxserve.engine.request import FinishReason, SamplingParams
from jaxserve.engine.runner import (
    REFERENCE_ROWS_MIN_TOKENS,
    flash_prefill_unsupported,
    pick_attention,
)
from jaxserve.errors import ConfigError, InvalidRequestError
from pallas_kernels.cpu_decode_attention import available as cpu_attention_available
from pallas_kernels.cpu_matmul import available as cpu_matmul_available
from pallas_kernels.paged_attention import ragged_paged_attention_reference

PAGE_BYTES = 2 * 30 * 16 * 3 * 64 * 4  # K and V, 30 layers, 16 tokens, 3 heads x 64, f32


def make_engine(demo_config, demo_model, **overrides) -> Engine:
    config = demo_config.replace(**overrides)
    m = demo_model
    return Engine(config, m.model_config, m.params, m.tokenizer, m.mesh)


def run(engine: Engine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]]):
    """Add requests at the given steps; step until done. Returns {id: (tokens, text, reason)}."""
    results: dict[str, list] = {}
    step = 0
    while step <= max(arrivals, default=0) or engine.has_unfinished():
        for rid, ids, params in arrivals.get(step, []):
            engine.add_request(ids, params, request_id=rid)
            results[rid] = [[], "", None]
        for out in engine.step():
            r = results[out.request_id]
            r[0] += out.token_ids
            r[1] += out.text
            if out.finished:
                r[2] = out.finish_reason
        step += 1
        for pt in engine.page_tables:
            pt.check_integrity()
    return {k: tuple(v) for k, v in results.items()}


def prompts(tokenizer, n):
    words = ("The history of the Roman empire", "def quicksort(items):",
             "List three colors:", "In 1969, the first", "Water boils at",
             "A poem about autumn leaves falling", "The quick brown fox", "Dear friend,")
    out = []
    for i in range(n):
        text = " ".join(words[(i + j) % len(words)] for j in range(2 + i % 5 * 3))
        out.append(tokenizer.encode(text))
    return out


@pytest.fixture(scope="module")
def greedy_alone(demo_config, demo_model):
    engine = make_engine(demo_config, demo_model)
    ps = prompts(demo_model.tokenizer, 17)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    alone = {}
    for i, ids in enumerate(ps):
        alone[f"r{i}"] = run(engine, {0: [(f"r{i}", ids, params)]})[f"r{i}"]
    return ps, params, alone


def test_batching_chunking_and_preemption_do_not_change_greedy_output(
        demo_config, demo_model, greedy_alone):
    ps, params, alone = greedy_alone
    assert max(len(p) for p in ps) > 64  # longer than the token budget: chunked prefill
    # 26 pages of 16 tokens for 17 requests of up to ~90 tokens: preemption is certain.
    engine = make_engine(demo_config, demo_model, cache__kv_cache_memory=26 * PAGE_BYTES,
                         cache__max_model_len=256)
    assert engine.runner.num_pages == 26
    arrivals: dict = {}
    for i, ids in enumerate(ps):
        arrivals.setdefault(i // 3 * 2, []).append((f"r{i}", ids, params))
    together = run(engine, arrivals)
    assert engine.scheduler.num_preemptions > 0
    for rid, (tokens, text, reason) in alone.items():
        assert together[rid] == (tokens, text, reason), rid
    assert engine.stats().pages_used == 0
    assert engine.stats().num_running == engine.stats().num_waiting == 0


def test_no_compilation_after_warm_up_and_cache_updated_in_place(demo_config, demo_model,
                                                                  mixed_sampling):
    engine = make_engine(demo_config, demo_model)
    ran, run_padding = [], engine.runner.run_padding
    engine.runner.run_padding = lambda bucket: (ran.append(bucket), run_padding(bucket))
    engine.warm_up(progress=False)
    # each program a decode step can land in ran once (16 slots: the 16-token bucket), so
    # its first run's set-up is not a request's; on a CPU the prefill programs did not
    programs = engine.runner.step_programs()
    assert len(programs) == 4
    decode = [p for p in programs if p[0] == 16]
    assert ran == (decode if jax.default_backend() == "cpu" else programs)
    assert len(decode) == 2
    compiled = engine.runner.num_compilations
    buffer = engine.runner.state.k_pages.unsafe_buffer_pointer()
    ps = prompts(demo_model.tokenizer, 6)
    mixed = mixed_sampling
    run(engine, {i: [(f"m{i}", ids, p)] for i, (ids, p) in enumerate(zip(ps, mixed, strict=True))})
    assert engine.runner.num_compilations == compiled
    assert engine.runner.state.k_pages.unsafe_buffer_pointer() == buffer


def test_stop_strings_are_matched_across_tokens_and_never_emitted(demo_config, demo_model):
    engine = make_engine(demo_config, demo_model)
    ids = demo_model.tokenizer.encode("Once upon a time, in a small village,")
    free = run(engine, {0: [("a", ids, SamplingParams(max_tokens=30, temperature=0.0))]})["a"]
    text = free[1]
    # a piece that starts and ends inside tokens; and one longer than the text of the first
    # tokens, so text is held back before there is as much as a stop string's length
    for i, (a, b) in enumerate([(9, 16), (1, 25)]):
        stop = text[a:b]
        assert len(demo_model.tokenizer.encode(stop, add_special_tokens=False)) > 1
        params = SamplingParams(max_tokens=30, temperature=0.0, stop=(stop, "zzzz"))
        tokens, got, reason = run(engine, {0: [(f"b{i}", ids, params)]})[f"b{i}"]
        assert reason is FinishReason.STOP
        assert got == text[: text.index(stop)]
        assert tokens == free[0][: len(tokens)]


def test_a_stop_string_completed_before_min_tokens_is_passed_over(demo_config, demo_model):
    """Whatever the other stop strings: a long one holds more text back, and the short one,
    completed before min_tokens, was then still found once min_tokens was reached."""
    engine = make_engine(demo_config, demo_model)
    tok = demo_model.tokenizer
    ids = tok.encode("Once upon a time, in a small village,")
    free = run(engine, {0: [("a", ids, SamplingParams(max_tokens=12, temperature=0.0))]})["a"]
    stop = tok.decode(free[0][:2])  # completed by the second token
    assert free[1].startswith(stop) and free[1].find(stop, 1) == -1
    for i, stops in enumerate([(stop,), (stop, "x" * 40)]):
        params = SamplingParams(max_tokens=12, temperature=0.0, min_tokens=4, stop=stops)
        got = run(engine, {0: [(f"b{i}", ids, params)]})[f"b{i}"]
        assert got[:3] == free[:3], stops


def test_a_stop_string_in_a_last_token_held_for_its_unfinished_character_still_stops(
        demo_config, demo_model):
    """A token that completes a stop string and starts a multi-byte character (" \\xe2\\x80")
    is held whole by the detokenizer; when it is the last token (max_tokens, or EOS next)
    its text is checked for the stop string too."""
    engine = make_engine(demo_config, demo_model)
    tok = demo_model.tokenizer
    held = next(i for i in range(tok.vocab_size) if tok.decode([i]) == " \ufffd")
    said = tok.encode(" He said:", add_special_tokens=False)
    prompt = tok.encode("Q:")
    for name, tail in (("length", []), ("eos", [tok.eos_ids[0]])):
        ids = [*said, held, *tail]
        params = SamplingParams(max_tokens=len(said) + 1 if not tail else 50,
                                stop=("said: ",))
        rid = engine.add_request(prompt, params, name)
        tracked = engine._tracked[rid]
        for token in ids:
            engine._append(tracked, token, None)
        assert "".join(out.text for out in tracked.queued) == " He ", name
        assert tracked.queued[-1].finish_reason is FinishReason.STOP, name
    engine.step()  # the finished requests leave
    assert not engine.has_unfinished()


def test_eos_min_tokens_and_ignore_eos(demo_config, demo_model):
    engine = make_engine(demo_config, demo_model)
    tok = demo_model.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": "What is 2+2?"}])
    base = run(engine, {0: [("a", ids, SamplingParams(max_tokens=40, temperature=0.0))]})["a"]
    assert base[2] is FinishReason.STOP and base[0][-1] in tok.eos_ids  # EOS id included
    assert tok.decode([base[0][-1]]) == "" and "<|im_end|>" not in base[1]
    n = len(base[0])
    longer = run(engine, {0: [("b", ids, SamplingParams(max_tokens=40, temperature=0.0,
                                                        min_tokens=n + 3))]})["b"]
    assert len(longer[0]) >= n + 3
    assert not any(t in tok.eos_ids for t in longer[0][: n + 2])
    ignored = run(engine, {0: [("c", ids, SamplingParams(max_tokens=n + 4, temperature=0.0,
                                                         ignore_eos=True))]})["c"]
    assert ignored[2] is FinishReason.LENGTH and len(ignored[0]) == n + 4
    assert ignored[0][:n] == base[0]
    stop_id = base[0][2]
    by_id = run(engine, {0: [("d", ids, SamplingParams(max_tokens=40, temperature=0.0,
                                                       stop_token_ids=(stop_id,)))]})["d"]
    assert by_id[0] == base[0][:3] and by_id[2] is FinishReason.STOP


def test_a_failed_step_leaves_no_unwritten_page_in_the_prefix_cache(demo_config, demo_model):
    """The scheduler offers a prompt's full pages to the prefix cache as it schedules them;
    when the step then fails (here before it is dispatched, so nothing is written), those
    pages must not serve the same prompt later."""
    ids = demo_model.tokenizer.encode("A failed step, then the same prompt again: " * 4)
    assert len(ids) > 2 * 16  # two full pages
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    cold = run(make_engine(demo_config, demo_model), {0: [("cold", ids, params)]})["cold"]
    engine = make_engine(demo_config, demo_model)
    execute = engine.runner.execute

    def fails_once(*args):
        engine.runner.execute = execute
        raise RuntimeError("injected step fault")

    engine.runner.execute = fails_once
    engine.add_request(ids, params, request_id="failed")
    with pytest.raises(RuntimeError, match="injected step fault"):
        engine.step()
    assert engine.abort("failed")  # what the server's loop and the offline API do then
    assert [o.finish_reason for o in engine.step()] == [FinishReason.ABORT]
    assert engine.stats().pages_used == 0 and not engine.has_unfinished()
    again = run(engine, {0: [("again", ids, params)]})["again"]
    assert again == cold


def test_abort_frees_pages_and_ends_with_abort(demo_config, demo_model):
    engine = make_engine(demo_config, demo_model)
    ids = demo_model.tokenizer.encode("Tell me a long story about dragons")
    engine.add_request(ids, SamplingParams(max_tokens=100, temperature=0.0), request_id="x")
    engine.add_request(ids, SamplingParams(max_tokens=3, temperature=0.0), request_id="y")
    outs = []
    for _ in range(3):
        outs += engine.step()
    assert engine.stats().pages_used > 0
    assert engine.abort("x") and not engine.abort("x")
    while engine.has_unfinished():
        outs += engine.step()
    last = {o.request_id: o for o in outs if o.finished}
    assert last["x"].finish_reason is FinishReason.ABORT
    assert last["y"].finish_reason is FinishReason.LENGTH
    assert engine.stats().pages_used == 0
    for pt in engine.page_tables:
        pt.check_integrity()


def test_seeded_sampling_ignores_the_rest_of_the_batch(demo_config, demo_model):
    engine = make_engine(demo_config, demo_model)
    ps = prompts(demo_model.tokenizer, 5)
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.95, seed=1234)
    alone = run(engine, {0: [("s", ps[0], params)]})["s"][0]
    others = [(f"o{i}", p, SamplingParams(max_tokens=6, temperature=1.0))
              for i, p in enumerate(ps[1:])]
    batched = run(engine, {0: others[:2], 1: [("s", ps[0], params)], 2: others[2:]})["s"][0]
    other_seed = run(engine, {0: [("t", ps[0], SamplingParams(
        max_tokens=8, temperature=1.0, top_p=0.95, seed=99))]})["t"][0]
    assert alone == batched
    assert alone != other_seed


def test_logprobs_report_the_chosen_token(demo_config, demo_model):
    engine = make_engine(demo_config, demo_model)
    ids = demo_model.tokenizer.encode("The capital of France is")
    engine.add_request(ids, SamplingParams(max_tokens=4, temperature=0.0, logprobs=3), "l")
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    lps = [lp for o in outs for lp in o.logprobs]
    assert len(lps) == 4
    for lp in lps:
        assert lp.top[0][0] == lp.token_id and len(lp.top) == 3
        assert np.isclose(lp.top[0][1], lp.logprob) and lp.logprob <= 0


@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(stop=tuple(f"s{i}" for i in range(17))), "stop"),
    (dict(stop_token_ids=(49152,)), "stop_token_ids"),
    (dict(max_tokens=2040), "max_tokens"),
    (dict(logprobs=50), "logprobs"),
    (dict(min_p=2.0), "min_p"),
])
def test_bad_sampling_values_name_the_field(demo_config, demo_model, kwargs, field):
    engine = _shared_engine(demo_config, demo_model)
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], SamplingParams(**kwargs))
    assert e.value.field == field


@pytest.mark.parametrize(("ids", "field"), [
    ([], "prompt"), ([5, 49152], "token_ids"), ([-1], "token_ids"), ([7] * 2048, "prompt")])
def test_bad_prompts_name_the_field(demo_config, demo_model, ids, field):
    engine = _shared_engine(demo_config, demo_model)
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request(ids, SamplingParams(max_tokens=1))
    assert e.value.field == field


def test_engine_keeps_serving_after_bad_requests(demo_config, demo_model):
    engine = _shared_engine(demo_config, demo_model)
    with pytest.raises(InvalidRequestError):
        engine.add_request([1], SamplingParams(temperature=-1))
    out = run(engine, {0: [("ok", [1, 2, 3], SamplingParams(max_tokens=2, temperature=0.0))]})
    assert len(out["ok"][0]) == 2
    assert engine.stats().pages_used == 0


_ENGINES: dict = {}


def _shared_engine(demo_config, demo_model) -> Engine:
    if "e" not in _ENGINES:
        _ENGINES["e"] = make_engine(demo_config, demo_model)
    return _ENGINES["e"]


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU refusal")
def test_pallas_backend_without_gpu_is_a_config_error(demo_config, demo_model):
    with pytest.raises(ConfigError, match="attention_backend: pallas needs a GPU"):
        make_engine(demo_config, demo_model, runner__attention_backend="pallas")


def test_a_head_dim_the_pallas_kernels_cannot_take_is_refused_or_auto_says_so(monkeypatch,
                                                                              capsys):
    """On a GPU: head_dim 80 (OpenLLaMA-3B has 100) failed in the kernel with a traceback
    after the model had loaded. Now pallas is a ConfigError and auto takes the reference
    attention, saying so once."""
    from jaxserve.engine import runner

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    for backend in ("pallas", "pallas_flash"):
        with pytest.raises(ConfigError, match=rf"^runner.attention_backend: {backend}: the "
                                              r"Pallas kernels need head_dim a power of two "
                                              r">= 16 \(this model's is 80\); use auto or "):
            pick_attention(backend, head_dim=80)
    runner._note_once.cache_clear()
    for decode_only in (False, True):
        fn = pick_attention("auto", head_dim=80, decode_only=decode_only)
        assert fn is ragged_paged_attention_reference
    err = capsys.readouterr().err
    assert err.count("attention_backend auto uses the reference attention (slower) on this "
                     "GPU: the Pallas kernels need head_dim a power of two >= 16") == 1


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU refusal")
def test_flash_prefill_backend_needs_a_hopper_gpu(demo_config, demo_model):
    with pytest.raises(ConfigError, match="attention_backend: pallas_flash needs a GPU"):
        make_engine(demo_config, demo_model, runner__attention_backend="pallas_flash")
    assert "needs a Hopper GPU" in flash_prefill_unsupported(jnp.bfloat16, 128)
    assert pick_attention("auto") is ragged_paged_attention_reference  # CPU: the reference


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the CPU's attention")
def test_cpu_prefill_programs_hand_the_reference_the_new_kv_rows(demo_config, demo_model):
    """Programs of 64 tokens or more (prefill buckets) pass this step's K/V rows to the
    reference attention, whose window formulation reads prefill chunks' keys from them;
    smaller programs (decodes) pass none. With runner.cpu_kernels (null: on where the
    kernels run) both hand the token formulation to the CPU decode attention kernel."""
    kernels = cpu_attention_available() and cpu_matmul_available()
    for setting in (None, False):
        runner = make_engine(demo_config, demo_model, runner__cpu_kernels=setting).runner
        on = kernels and setting is None
        assert runner._prefill_tokens == REFERENCE_ROWS_MIN_TOKENS == 64
        prefill = runner._prefill_step.model.attention_fn
        assert prefill.func is ragged_paged_attention_reference and prefill.takes_new_kv
        assert prefill.keywords == {"cpu_kernel": on}
        decode = runner._step.model.attention_fn
        if on:
            assert decode.func is ragged_paged_attention_reference
            assert decode.keywords == {"cpu_kernel": True}
        else:
            assert decode is ragged_paged_attention_reference


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU note")
def test_paged_prefill_where_auto_picks_no_flash_backend_is_noted(capsys):
    assert pick_attention("auto", paged_prefill=True) is ragged_paged_attention_reference
    assert ("runner.paged_prefill: true is not used: attention_backend auto picked reference"
            in capsys.readouterr().err)
    assert pick_attention("auto") is ragged_paged_attention_reference  # null: no note
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("pages, page_size, match", [
    (jnp.float8_e4m3fn, 16, "q and pages must be bf16 or f16 alike"),
    (jnp.bfloat16, 256, "page_size 256 must divide block_kv 128"),
])
def test_paged_prefill_refuses_pages_its_kernel_cannot_take(monkeypatch, pages, page_size,
                                                             match):
    """Checked as on a Hopper GPU (the backend and the flash check stubbed), where it would
    otherwise leave those chunks on the ragged kernel without a word."""
    import jaxserve.engine.runner as runner
    monkeypatch.setattr(runner.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(runner, "flash_prefill_unsupported", lambda dtype, head_dim: None)
    with pytest.raises(ConfigError, match=f"runner.paged_prefill: .*{match}"):
        pick_attention("pallas_flash", paged_prefill=True, pages_dtype=pages,
                       page_size=page_size)
    assert pick_attention("pallas_flash", paged_prefill=True).keywords == {"min_chunk": 128}
    # null (the default): the kernel where it takes the pages, else the flash kernel alone
    from pallas_kernels.flash_prefill import ragged_paged_attention_flash
    assert pick_attention("pallas_flash", pages_dtype=pages,
                          page_size=page_size) is ragged_paged_attention_flash
    assert pick_attention("pallas_flash").keywords == {"min_chunk": 128}
    assert pick_attention("pallas_flash", paged_prefill=False) is ragged_paged_attention_flash
    # with kv_writer every Pallas choice carries the RoPE + K/V write kernel, and keeps
    # what it was; without, the model's own ops do that work
    from pallas_kernels.paged_attention import ragged_paged_attention
    from pallas_kernels.rope_kv_write import rope_and_write_kv
    chunks, alone, plain, decode = (pick_attention(*a, kv_writer=True, **k) for a, k in (
        (("pallas_flash",), {"paged_prefill": True}), (("pallas_flash",), {}),
        (("pallas",), {}), (("pallas",), {"decode_only": True})))
    assert all(fn.rope_kv_writer is rope_and_write_kv for fn in (chunks, alone, plain, decode))
    assert chunks.takes_new_kv and chunks.keywords == {"min_chunk": 128}
    assert alone.func is ragged_paged_attention_flash and not plain.takes_new_kv
    assert decode.func is ragged_paged_attention and decode.keywords == {"decode_only": True}
    assert not hasattr(pick_attention("pallas"), "rope_kv_writer")


class _Device:
    """A device as kv_budget sees it: a platform and its memory statistics (or none)."""

    def __init__(self, platform, stats):
        self.platform, self._stats = platform, stats

    def memory_stats(self):
        return self._stats


def test_kv_cache_size_on_a_gpu_that_reports_no_memory_must_be_given(demo_config):
    from jaxserve.engine.kv_memory import kv_budget

    unset = demo_config.replace(cache__kv_cache_memory=None)
    assert kv_budget(unset, [_Device("gpu", {"bytes_limit": 1 << 40})]) == 0.9
    assert kv_budget(unset, [_Device("cpu", None)]) == 1 << 30
    with pytest.raises(ConfigError, match=r"cache.kv_cache_memory is unset, and these gpu "
                                          r"devices report no memory size .*VMM allocator"):
        kv_budget(unset, [_Device("gpu", None)])
    with pytest.raises(ConfigError, match=r"=0.5 is a fraction .* gpu devices report no "
                                          r"memory size; give a byte count \(e.g. 268435456\)$"):
        kv_budget(unset.replace(cache__kv_cache_memory=0.5), [_Device("gpu", None)])
    assert kv_budget(unset.replace(cache__kv_cache_memory=2.0**30),
                     [_Device("gpu", None)]) == 2.0**30


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU defaults")
def test_kv_cache_size_defaults_to_bytes_on_cpu_and_a_fraction_fails_first(demo_config,
                                                                          demo_model):
    from jaxserve.loader import load_model

    engine = make_engine(demo_config, demo_model, cache__kv_cache_memory=None)
    assert engine.runner.num_pages == (1 << 30) // PAGE_BYTES  # 1 GiB by default on CPU
    missing = demo_config.replace(checkpoint__source="/nonexistent/model.gguf",
                                  cache__kv_cache_memory=0.9)
    with pytest.raises(ConfigError, match=r"cache.kv_cache_memory=0.9 is a fraction of free "
                                          r"device memory, but cpu devices report no memory"):
        load_model(missing, progress=False)  # before the source is even looked at


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="a CPU host's memory")
def test_kv_cache_sizes_that_cannot_hold_a_sequence_or_fit_the_host_are_named(demo_config,
                                                                           demo_model):
    # exactly 128 pages: 2048 tokens, but page 0 is reserved, so 2032 hold tokens
    with pytest.raises(ConfigError) as e:
        make_engine(demo_config, demo_model, cache__max_model_len=2048,
                    cache__kv_cache_memory=128 * PAGE_BYTES)
    assert str(e.value) == (
        "cache.kv_cache_memory holds 128 pages of 16 tokens, one of them reserved: 2032 "
        "tokens, fewer than one sequence of cache.max_model_len=2048; one needs 129 pages, "
        f"{129 * PAGE_BYTES} bytes per device")
    assert make_engine(demo_config, demo_model, cache__max_model_len=2048,
                       cache__kv_cache_memory=129 * PAGE_BYTES).runner.num_pages == 129
    # more than the host has: refused before the cache is allocated (it was XLA's
    # RESOURCE_EXHAUSTED traceback)
    with pytest.raises(ConfigError, match=r"^cache.kv_cache_memory=1125899906842624 bytes per "
                                          r"device, but this host has \d+ bytes of memory; "
                                          r"give a smaller byte count$"):
        make_engine(demo_config, demo_model, cache__kv_cache_memory=float(2**50))


def _stub_free_memory(monkeypatch, free: int) -> None:
    """Devices that report `free` bytes free after the weights, as a GPU's do (a CPU's
    report none), with the allocator's slack at least 1 MiB instead of 256."""
    from jaxserve.engine import kv_memory, runner

    for module in (kv_memory, runner):
        monkeypatch.setattr(module, "free_device_bytes", lambda devices: free)
    monkeypatch.setattr(kv_memory, "SLACK_MIN_BYTES", 1 << 20)


def test_kv_pages_as_a_fraction_leave_room_for_the_largest_programs_scratch(
        demo_config, demo_model, monkeypatch, capsys):
    """Where the devices report their memory, the largest step program compiles before the
    pages are allocated: a fraction of free memory gives the pages no more than leaves
    room for its XLA scratch, the penalty tables and the slack (it gave them the whole
    fraction, and such a program ran out of memory at warm-up)."""
    from jaxserve.engine.kv_memory import per_device_bytes, slack_bytes

    free = 256 << 20
    _stub_free_memory(monkeypatch, free)
    # room to spare: the fraction's pages, and the program compiled for them is warm-up's
    engine = make_engine(demo_config, demo_model, cache__kv_cache_memory=0.5)
    runner = engine.runner
    top = max(runner.step_programs())
    assert top[:2] == (64, 16)
    assert runner.num_pages == int(0.5 * free) // PAGE_BYTES
    probe = runner._compiled[top]
    scratch = probe.memory_analysis().temp_size_in_bytes
    state = runner.state
    others = per_device_bytes((state.prompt_mask, state.output_counts))
    assert scratch > 0 and others == runner.num_slots * 49152 * (1 + 4)  # bool, int32
    # too little room beside 0.9 of it: the pages that leave it, and a program for them
    capsys.readouterr()
    engine = make_engine(demo_config, demo_model, cache__kv_cache_memory=0.9)
    runner = engine.runner
    fits = (free - scratch - others - slack_bytes(free)) // PAGE_BYTES
    assert fits < int(0.9 * free) // PAGE_BYTES
    assert runner.num_pages == fits
    assert (f"jaxserve: note: {fits} KV pages, not the {int(0.9 * free) // PAGE_BYTES} of "
            "cache.kv_cache_memory=0.9: they leave room for the XLA scratch of the step "
            f"program of 64 tokens and 16 sequences ({scratch / 2**30:.2f} GiB)\n"
            ) in capsys.readouterr().err
    assert runner.num_pages * PAGE_BYTES + scratch + others <= free
    assert runner.state.k_pages.shape[1] == fits and top not in runner._compiled
    assert engine.stats().pages_total == fits - 1
    engine.warm_up(progress=False)
    out = run(engine, {0: [("a", list(range(10, 60)), SamplingParams(max_tokens=4))]})
    assert len(out["a"][0]) == 4 and engine.stats().pages_used == 0
    # bytes that leave the scratch no room: refused before warm-up
    given = free - (scratch + others) // 2
    with pytest.raises(ConfigError) as e:
        make_engine(demo_config, demo_model, cache__kv_cache_memory=float(given))
    pages = given // PAGE_BYTES
    assert str(e.value) == (
        f"cache.kv_cache_memory={given} bytes per device of KV pages, the XLA scratch of the "
        f"step program of 64 tokens and 16 sequences ({scratch / 2**30:.2f} GiB) and the "
        f"step's other state ({others} bytes) need {pages * PAGE_BYTES + scratch + others} "
        f"bytes, but the device with least free memory has {free} bytes free after the "
        f"weights: give the pages at most {_fits_bytes(free, scratch, others)} bytes, or a "
        "fraction of free memory (it leaves the scratch its room), or lower "
        "scheduler.max_num_batched_tokens and runner.token_buckets")
    # a fraction whose pages hold a sequence of 2048 tokens (129 pages) but not beside the
    # scratch
    _stub_free_memory(monkeypatch, -(-130 * PAGE_BYTES * 10 // 9))
    with pytest.raises(ConfigError, match=r"^cache.kv_cache_memory holds \d+ pages of 16 "
                                          r"tokens beside the XLA scratch of the step program "
                                          r"of 64 tokens and 16 sequences \(\d.\d\d GiB\), "
                                          r"one of them reserved: "):
        make_engine(demo_config, demo_model, cache__kv_cache_memory=0.9)


def _fits_bytes(free: int, scratch: int, others: int) -> int:
    return (free - scratch - others) // PAGE_BYTES * PAGE_BYTES


def test_max_logprobs_beyond_the_vocabulary_is_a_config_error(tmp_path, monkeypatch):
    from engine_checks import save_tiny_shape

    from jaxserve import loader
    from jaxserve.config import Config
    from jaxserve.loader import load_model

    config = Config().replace(
        model__name="tiny", model__dtype="float32", checkpoint__source="random",
        checkpoint__random_shape=str(save_tiny_shape(tmp_path / "tiny.json")),
        cache__max_model_len=64, cache__kv_cache_memory=float(1 << 20),
        runner__compilation_cache_dir=None, runner__max_logprobs=200)

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were made before the check")

    with monkeypatch.context() as m:
        m.setattr(loader, "random_params", no_weights)
        with pytest.raises(ConfigError) as e:  # it was top_k's ValueError from the first step
            load_model(config, progress=False)
        assert str(e.value) == ("runner.max_logprobs: 200 is more than the model's "
                                "vocabulary of 128 tokens")
        # a KV budget in bytes that holds no sequence: before the weights too
        with pytest.raises(ConfigError, match=r"^cache.kv_cache_memory holds 0 pages of 16 "
                                              r"tokens, one of them reserved: no token, fewer "):
            load_model(config.replace(runner__max_logprobs=20,
                                      cache__kv_cache_memory=float(1 << 10)), progress=False)
    m = load_model(config.replace(runner__max_logprobs=20), progress=False)
    with pytest.raises(ConfigError, match="runner.max_logprobs: 200 is more than"):
        Engine(config, m.model_config, m.params, None, m.mesh)  # the engine checks it too


def test_a_program_out_of_device_memory_at_warm_up_is_a_config_error_naming_the_fix(
        demo_config, demo_model, monkeypatch):
    """XLA's out-of-memory at a program's first run becomes a ConfigError that names the
    program and what makes room; any other runtime error passes through as it is."""
    engine = make_engine(demo_config, demo_model)
    runner, ran, real = engine.runner, [], engine.runner.run_padding
    oom = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4.02GiB\nmore detail"

    def run_padding(bucket):
        ran.append(bucket)
        if len(ran) == 1:
            raise jax.errors.JaxRuntimeError(oom)
        real(bucket)

    monkeypatch.setattr(runner, "run_padding", run_padding)
    with pytest.raises(ConfigError) as e:
        engine.warm_up(progress=False)
    message = str(e.value)
    tokens, seqs = ran[0][:2]
    assert f"step program of {tokens} tokens and {seqs} sequences ran out" in message
    assert f"beside {runner.num_pages} KV pages" in message
    assert f"cache.kv_cache_memory: {demo_config.cache.kv_cache_memory:.0f} bytes" in message
    assert "scheduler.max_num_batched_tokens" in message and "largest 64" in message
    assert message.endswith("XLA: RESOURCE_EXHAUSTED: Out of memory while trying to "
                            "allocate 4.02GiB")
    assert "XLA scratch: " in message and "not reported" not in message

    def fails(bucket):
        raise jax.errors.JaxRuntimeError("INTERNAL: a kernel failed")

    monkeypatch.setattr(runner, "run_padding", fails)
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL: a kernel failed"):
        engine.warm_up(progress=False)
