"""The offline API: `LLM(config).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses
import itertools
import os
import uuid

from jaxserve.config import Config, load_config
from jaxserve.engine.engine import Engine
from jaxserve.engine.heap import freeze_startup
from jaxserve.engine.input_processor import Prompt
from jaxserve.engine.request import FinishReason, RequestMetrics, SamplingParams, TokenLogprob
from jaxserve.errors import InvalidRequestError
from jaxserve.loader import load_model


class PromptError(InvalidRequestError):
    """Prompt `index` of a generate() call is invalid: `error` says why (its field is
    named within that prompt)."""

    def __init__(self, index: int, error: InvalidRequestError):
        super().__init__(f"prompts[{index}].{error.field}", error.message)
        self.index, self.error = index, error


@dataclasses.dataclass(frozen=True)
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids; an EOS that ended generation is included
    text: str
    finish_reason: FinishReason
    logprobs: list[TokenLogprob]
    metrics: RequestMetrics | None
    error: str | None = None  # why it failed, when finish_reason is ERROR


class LLM:
    def __init__(self, config: Config | str | os.PathLike, *, warm_up: bool = False,
                 progress: bool = True):
        self.config = config if isinstance(config, Config) else load_config(config)
        loaded = load_model(self.config, progress=progress)
        self.tokenizer = loaded.tokenizer
        self.engine = Engine(self.config, loaded.model_config, loaded.params, loaded.tokenizer,
                             loaded.mesh)
        if warm_up:
            self.engine.warm_up(progress)
        freeze_startup()  # the model's and the engine's objects: no collection walks them
        # Request ids of their own: a caller may add requests to self.engine directly.
        self._ids = (f"llm-{uuid.uuid4().hex[:8]}-{n}" for n in itertools.count())

    def generate(self, prompts: Prompt | list[Prompt],
                 params: SamplingParams | list[SamplingParams] | None = None, *,
                 chat: bool = False) -> list[Completion]:
        """Run prompts to completion; results come back in input order. An invalid prompt
        raises PromptError naming its index before any is queued. Requests added to
        self.engine directly run on meanwhile; their outputs are not returned here."""
        if isinstance(prompts, str | dict) or (isinstance(prompts, list) and prompts
                                               and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise InvalidRequestError("params", f"{len(params_list)} SamplingParams for "
                                                f"{len(prompts)} prompts")
        encoded = []
        for index, (prompt, p) in enumerate(zip(prompts, params_list, strict=True)):
            try:  # reject before anything is queued
                encoded.append(self.engine.inputs.encode(prompt, chat))
                self.engine.validate(encoded[-1], p)
            except InvalidRequestError as e:
                raise PromptError(index, e) from None
        ids = [next(self._ids) for _ in prompts]
        results = {i: dict(tokens=[], text=[], logprobs=[]) for i in ids}
        done: dict[str, Completion] = {}
        try:
            for i, e, p in zip(ids, encoded, params_list, strict=True):
                self.engine.add_request(e, p, i)
            while self.engine.has_unfinished():  # also drains the step still in flight
                for out in self.engine.step():
                    r = results.get(out.request_id)
                    if r is None:  # a request someone else added to the engine
                        continue
                    r["tokens"].extend(out.token_ids)
                    r["text"].append(out.text)
                    r["logprobs"].extend(out.logprobs)
                    if out.finished:
                        done[out.request_id] = out
        except BaseException:  # Ctrl-C or a failed step: leave the engine empty for next time
            self._abandon(ids)
            raise
        return [
            Completion(i, e, results[i]["tokens"], "".join(results[i]["text"]),
                       done[i].finish_reason, results[i]["logprobs"], done[i].metrics,
                       done[i].error)
            for i, e in zip(ids, encoded, strict=True)
        ]

    def _abandon(self, ids: list[str]) -> None:
        """Abort these requests and let the step still in flight finish."""
        for i in ids:
            self.engine.abort(i)
        try:
            while self.engine.has_unfinished():
                self.engine.step()
        except Exception:  # the engine is broken: the original error is the one to see
            pass
