"""Speculative decoding: proposals by n-gram lookup (prompt lookup) or by a draft model
(draft.py), and their bookkeeping.

Each step, a request that speculates proposes up to k tokens: the tokens that followed the
last earlier occurrence of its context's final n tokens (n from `ngram_max` down to
`ngram_min`). The step computes its last token and the k proposed ones as one chunk of the
ragged batch and samples a token at every position (device_step.py). Proposal j is
accepted while the token sampled at the position before it equals it; the first token
that differs, or the one after the last proposal, is the step's own new token.

Why that is exact: a proposal here is a single token, not a distribution, so the published
rejection rule (accept x with probability min(1, p(x)/q(x)), else sample from the residual
max(p - q, 0)) becomes: accept x with probability p(x), else sample from p without x. A
token sampled from p equals x with probability p(x), and otherwise is distributed as p
without x. So sampling each position from the target model as usual and comparing is that
rule, and with the same (seed, output index) keys as without speculation it gives the very
same tokens: greedy or sampled, output is unchanged, only faster.

What cannot speculate (the request decodes normally): penalties (each position's
distribution would depend on the proposals before it), a position inside `min_tokens`
(banned ids depend on the position), `speculative: false` on the request, and a request
whose acceptance stayed below `min_accepted` per step over `window` steps.
"""

from __future__ import annotations

import numpy as np

from jaxserve.config import SpeculativeSection
from jaxserve.engine.request import Request


def make_proposer(config: SpeculativeSection, vocab_size: int):
    """The proposer of speculative.method: NgramProposer, or a DraftProposer (draft.py)."""
    if config.method == "ngram":
        return NgramProposer(config)
    from jaxserve.engine.draft import DraftProposer
    return DraftProposer.load(config.draft_config, vocab_size)


class NgramProposer:
    def __init__(self, config: SpeculativeSection):
        self.config = config

    def propose(self, requests: list[Request], room: dict[str, int]) -> dict[str, list[int]]:
        """Up to room[id] tokens for each request (see lookup)."""
        return {req.request_id: self.lookup(req.token_ids, room[req.request_id])
                for req in requests}

    def forget(self, request_id: str) -> None:
        pass  # nothing kept per request

    def warm_up(self, progress: bool = False, stop=None) -> bool:
        return True  # nothing to compile

    def lookup(self, token_ids, k: int) -> list[int]:
        """Up to k tokens that followed the last earlier occurrence of the longest suffix
        (ngram_max down to ngram_min tokens) of token_ids; [] when none occurs."""
        ids = np.asarray(token_ids, np.int64)
        n_all = len(ids)
        for n in range(min(self.config.ngram_max, n_all - 1), self.config.ngram_min - 1, -1):
            suffix = ids[n_all - n:]
            windows = np.lib.stride_tricks.sliding_window_view(ids[:n_all - 1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                return ids[start:start + k].tolist()
        return []


def may_speculate(req: Request) -> bool:
    p = req.params
    return (req.speculating and p.speculative and not p.uses_penalties
            and len(req.output_ids) >= p.min_tokens)


def record(req: Request, proposed: int, accepted: int, config: SpeculativeSection) -> None:
    """Count one step of a speculating request (proposed is 0 when nothing matched). It
    stops speculating when, over its last `window` steps, fewer than `min_accepted` tokens
    per step were accepted."""
    s = req.spec
    s.add(proposed, accepted)
    s.recent.append(accepted)  # a step with no proposal counts as none accepted
    if len(s.recent) > config.window:
        s.recent.popleft()
    if len(s.recent) == config.window and sum(s.recent) < config.min_accepted * config.window:
        req.speculating = False
