"""The offline API: `LLM(config).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses
import os

from jaxserve.config import Config, load_config
from jaxserve.engine.engine import Engine
from jaxserve.engine.request import FinishReason, RequestMetrics, SamplingParams, TokenLogprob
from jaxserve.errors import InvalidRequestError
from jaxserve.loader import load_model
from jaxserve.tokenizer import Tokenizer

# A prompt: text, token ids, {"prompt": text}, or {"messages": [{"role", "content"}, ...]}.
Prompt = str | list[int] | dict


@dataclasses.dataclass(frozen=True)
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids; an EOS that ended generation is included
    text: str
    finish_reason: FinishReason
    logprobs: list[TokenLogprob]
    metrics: RequestMetrics | None


def encode_prompt(tokenizer: Tokenizer | None, prompt: Prompt, chat: bool = False) -> list[int]:
    """Token ids of a prompt; chat renders the model's chat template over a user message."""
    if isinstance(prompt, dict):
        if "messages" in prompt:
            return _encode_messages(tokenizer, prompt["messages"])
        if "prompt" not in prompt:
            raise InvalidRequestError("prompt", "expected a 'prompt' or 'messages' key")
        prompt = prompt["prompt"]
    if isinstance(prompt, list):
        return [int(t) for t in prompt]
    if not isinstance(prompt, str) or not prompt:
        raise InvalidRequestError("prompt", "the prompt is empty")
    if tokenizer is None:
        raise InvalidRequestError("prompt", "this model has no tokenizer; send token ids")
    if chat:
        return _encode_messages(tokenizer, [{"role": "user", "content": prompt}])
    return tokenizer.encode(prompt)


def _encode_messages(tokenizer: Tokenizer | None, messages) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages", "expected a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise InvalidRequestError(f"messages[{i}]",
                                      "each message needs string 'role' and 'content'")
    if tokenizer is None or tokenizer.chat_template is None:
        raise InvalidRequestError("messages", "this model has no chat template")
    return tokenizer.encode_chat(messages)


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

    def generate(self, prompts: Prompt | list[Prompt],
                 params: SamplingParams | list[SamplingParams] | None = None, *,
                 chat: bool = False) -> list[Completion]:
        """Run prompts to completion; results come back in input order."""
        if isinstance(prompts, str | dict) or (isinstance(prompts, list) and prompts
                                               and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        encoded = [encode_prompt(self.tokenizer, p, chat) for p in prompts]
        for ids, p in zip(encoded, params_list, strict=True):
            self.engine.validate(ids, p)  # reject before anything is queued
        ids = [self.engine.add_request(e, p) for e, p in zip(encoded, params_list, strict=True)]
        results = {i: dict(tokens=[], text=[], logprobs=[]) for i in ids}
        done: dict[str, Completion] = {}
        while self.engine.has_unfinished():  # also drains the step still in flight
            for out in self.engine.step():
                r = results[out.request_id]
                r["tokens"].extend(out.token_ids)
                r["text"].append(out.text)
                r["logprobs"].extend(out.logprobs)
                if out.finished:
                    done[out.request_id] = out
        return [
            Completion(i, e, results[i]["tokens"], "".join(results[i]["text"]),
                       done[i].finish_reason, results[i]["logprobs"], done[i].metrics)
            for i, e in zip(ids, encoded, strict=True)
        ]
