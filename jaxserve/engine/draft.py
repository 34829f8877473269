"""Proposals from a draft model: a smaller model (or the same one) decoding greedily.

The draft runs on its own Runner, with its own paged KV cache, page table and penalty slots,
on the devices of its own config. For each request that speculates it keeps a shadow
sequence: the request's tokens as the draft has computed them. Each round the shadow is
brought in line with the request (cut back to the longest common prefix, so tokens the
target rejected leave the draft's cache too, then the new tokens computed), and the draft
samples k tokens greedily, one step each, all shadows batched.

A greedy draft proposes one token per position, not a distribution, so verification is the
same exact rule as for n-gram proposals (speculative.py): the output does not change.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from jaxserve.config import Config, load_config
from jaxserve.engine.page_table import PageTable
from jaxserve.engine.request import Request, SamplingParams, Status
from jaxserve.engine.runner import Runner
from jaxserve.engine.scheduler import ScheduledSeq, SchedulerOutput
from jaxserve.errors import ConfigError

GREEDY = SamplingParams(temperature=0.0, max_tokens=1 << 30)


def read_draft_config(path: str):
    """The draft model's config, checked before any model loads: it is a config file that
    loads, does not speculate itself and runs as one replica with no pipeline stages, in
    one process. Its errors name speculative.draft_config."""
    if jax.process_count() > 1:
        raise ConfigError("speculative.method: draft runs in one process; over "
                          f"{jax.process_count()} processes use ngram")
    try:
        config = load_config(path)
    except ConfigError as e:
        raise ConfigError(f"speculative.draft_config: {e}") from None
    if config.speculative.enabled:
        raise ConfigError(f"speculative.draft_config: {path} speculates itself "
                          f"(speculative.method: {config.speculative.method})")
    if config.mesh.data > 1 or config.mesh.pipeline > 1:  # one page table, read at once
        raise ConfigError(f"speculative.draft_config: {path} has mesh.data "
                          f"{config.mesh.data} and mesh.pipeline {config.mesh.pipeline}; "
                          "a draft runs as one replica with no pipeline stages (its "
                          "mesh.tensor may be > 1)")
    return config


class DraftProposer:
    def __init__(self, config: Config, model_config, params, mesh):
        """config: the draft model's own jaxserve config."""
        self.config = config
        # Its steps are read back as soon as they are dispatched (nothing to overlap), so
        # its calls are made inline, with no thread of their own to close.
        self.runner = Runner(config.replace(runner__dispatch_thread=False), model_config,
                             params, mesh, eos_ids=())
        # No prefix cache: a shadow's pages are cut back and rewritten as the target moves.
        self.page_table = PageTable(self.runner.num_pages, config.cache.page_size,
                                    enable_prefix_cache=False)
        self.max_shadows = config.scheduler.max_num_seqs
        self.budget = config.scheduler.max_num_batched_tokens
        self._shadows: dict[str, Request] = {}

    @classmethod
    def load(cls, path: str, target_vocab: int) -> DraftProposer:
        from jaxserve.loader import load_model

        config = read_draft_config(path)
        loaded = load_model(config, progress=False)
        if loaded.model_config.vocab_size != target_vocab:
            raise ConfigError(f"speculative.draft_config: the draft's vocabulary has "
                              f"{loaded.model_config.vocab_size} tokens, the model's "
                              f"{target_vocab}; a draft must share the tokenizer")
        return cls(config, loaded.model_config, loaded.params, loaded.mesh)

    def warm_up(self, progress: bool = False, stop: Callable[[], bool] | None = None) -> bool:
        return self.runner.warm_up(progress, stop)

    def propose(self, requests: list[Request], room: dict[str, int]) -> dict[str, list[int]]:
        """Up to room[id] greedy draft tokens following each request's known tokens, as
        many as the draft's own context (its cache.max_model_len) still holds; a request
        past it gets none, and its shadow is dropped."""
        limit = self.config.cache.max_model_len
        fits = []
        for req in requests:
            if req.num_tokens < limit:
                fits.append(req)
            else:
                self.forget(req.request_id)
        shadows = [self._sync(req) for req in fits[:self.max_shadows]
                   if req.request_id in self._shadows or len(self._shadows) < self.max_shadows]
        drafts = {sh.request_id: [] for sh in shadows}
        want = {sh.request_id: min(room[sh.request_id], limit - sh.num_tokens)
                for sh in shadows}
        # Each step computes what each shadow still lacks (all of it at first sight, in
        # chunks of the budget) and samples one token where it reaches the end.
        for _ in range(max(want.values(), default=0) + len(shadows) * 64):
            seqs, budget = [], self.budget
            for sh in shadows:
                remaining = sh.num_tokens - sh.num_computed_tokens
                if len(drafts[sh.request_id]) >= want[sh.request_id] or budget == 0:
                    continue
                n = min(remaining, budget)
                if not self.page_table.ensure(sh.request_id, sh.num_computed_tokens + n):
                    want[sh.request_id] = len(drafts[sh.request_id])  # no room: stop here
                    continue
                seqs.append(ScheduledSeq(sh, sh.num_computed_tokens, n, n == remaining))
                sh.num_computed_tokens += n
                budget -= n
            if not seqs:
                break
            handle = self.runner.execute(SchedulerOutput(tuple(seqs), ()), [self.page_table],
                                         None)
            out = handle.fetch()
            for sh, shard, row in handle.rows:
                sh.num_pending -= 1
                token = int(out.tokens[shard, row, 0])
                sh.output_ids.append(token)
                drafts[sh.request_id].append(token)
        return drafts

    def forget(self, request_id: str) -> None:
        """A request finished or was aborted: free its shadow's pages and slot."""
        if self._shadows.pop(request_id, None) is not None:
            self.page_table.free(request_id)
            self.runner.release(request_id)

    def _sync(self, req: Request) -> Request:
        """The request's shadow, holding exactly the request's tokens, its computed K/V
        cut back to their longest common prefix."""
        tokens = req.all_token_ids
        sh = self._shadows.get(req.request_id)
        if sh is None:
            sh = Request(req.request_id, tokens, GREEDY, seed=0, arrival_time=0.0,
                         status=Status.RUNNING)
            self.page_table.admit(req.request_id, tokens, use_cache=False)
            self._shadows[req.request_id] = sh
            return sh
        old, common = sh.all_token_ids, 0
        for a, b in zip(old, tokens, strict=False):
            if a != b:
                break
            common += 1
        sh.prompt_ids, sh.output_ids = tokens, []
        # The last known token's K/V is computed with the step that samples after it.
        sh.num_computed_tokens = min(sh.num_computed_tokens, common, len(tokens) - 1)
        self.page_table.truncate(req.request_id, sh.num_computed_tokens)
        return sh
