"""The one front door for prompts: text, token ids or chat messages -> checked token ids.

Both the offline `LLM` and the gRPC server turn prompts into ids here, so both refuse the
same inputs with the same InvalidRequestError (naming the field):
* a text longer in bytes than the context could hold is refused before it is tokenized
  (at most `max_model_len` tokens of at most `Tokenizer.max_token_bytes` bytes each), and
  so are more chat messages than the context has tokens, so rendering and tokenizing cost
  a bounded time however large the message;
* chat roles are the template's usual ones (system, user, assistant, tool);
* message content is plain text: a special-token string inside it (say `<|im_end|>`)
  stays text and cannot open or close a turn, unless `tokenizer.special_tokens_in_content`
  is set for trusted callers.
"""

from __future__ import annotations

import numbers

from jaxserve.errors import InvalidRequestError
from jaxserve.tokenizer import Tokenizer

# A prompt: text, token ids, {"prompt": text}, or {"messages": [{"role", "content"}, ...]}.
Prompt = str | list[int] | dict
CHAT_ROLES = ("system", "user", "assistant", "tool")


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, max_model_len: int,
                 special_tokens_in_content: bool = False):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.special_tokens_in_content = special_tokens_in_content
        self.max_prompt_bytes = (max_model_len * tokenizer.max_token_bytes
                                 if tokenizer is not None else 0)

    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        """Token ids of a prompt; `chat` renders the chat template over one user message."""
        if isinstance(prompt, dict):
            if "messages" in prompt:
                return self.encode_messages(prompt["messages"])
            if "prompt" not in prompt:
                raise InvalidRequestError("prompt", "expected a 'prompt' or 'messages' key")
            prompt = prompt["prompt"]
        if isinstance(prompt, list):
            if len(prompt) > self.max_model_len:
                raise InvalidRequestError("token_ids", f"{len(prompt)} token ids exceed the "
                                                       f"context of {self.max_model_len}")
            for t in prompt:  # 1.0 or True is no token id
                if not isinstance(t, numbers.Integral) or isinstance(t, bool):
                    raise InvalidRequestError("token_ids",
                                              f"token ids must be integers (got {t!r})")
            return [int(t) for t in prompt]
        if not isinstance(prompt, str):
            raise InvalidRequestError("prompt", "expected text or a list of token ids (got "
                                                f"{type(prompt).__name__})")
        if not prompt:
            raise InvalidRequestError("prompt", "the prompt is empty")
        tokenizer = self._need_tokenizer("prompt")
        if chat:
            return self.encode_messages([{"role": "user", "content": prompt}])
        self._check_bytes("prompt", len(prompt), prompt)
        return tokenizer.encode(prompt)

    def encode_messages(self, messages) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("messages", "expected a non-empty list of messages")
        if len(messages) > self.max_model_len:  # bounds the rendering's work, like the bytes
            raise InvalidRequestError("messages", f"{len(messages)} messages exceed the "
                                                  f"context of {self.max_model_len} tokens")
        total = 0
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise InvalidRequestError(f"messages[{i}]",
                                          "each message needs string 'role' and 'content'")
            if m["role"] not in CHAT_ROLES:
                raise InvalidRequestError(f"messages[{i}].role",
                                          f"must be one of {', '.join(CHAT_ROLES)} (got "
                                          f"{m['role'][:32]!r})")
            total += len(m["content"])
        tokenizer = self._need_tokenizer("messages")
        if tokenizer.chat_template is None:
            raise InvalidRequestError("messages", "this model has no chat template")
        self._check_bytes("messages", total, "".join(m["content"] for m in messages))
        try:
            return tokenizer.encode_chat(messages,
                                         plain_content=not self.special_tokens_in_content)
        except ValueError as e:  # the template refused these messages, or altered content
            raise InvalidRequestError("messages", str(e)) from None

    def _need_tokenizer(self, field: str) -> Tokenizer:
        if self.tokenizer is None:
            raise InvalidRequestError(field, "this model has no tokenizer; send token ids")
        return self.tokenizer

    def _check_bytes(self, field: str, num_chars: int, text: str) -> None:
        """Refuse text that cannot fit the context, without tokenizing it."""
        limit = self.max_prompt_bytes
        try:  # (the character count first: it spares encoding a text far too long)
            too_long = num_chars > limit or len(text.encode("utf-8")) > limit
        except UnicodeEncodeError as e:  # a lone surrogate: no tokenizer takes it
            raise InvalidRequestError(field, f"the text is not valid Unicode: a lone "
                                             f"surrogate {text[e.start]!r} at character "
                                             f"{e.start}") from None
        if too_long:
            raise InvalidRequestError(
                field, f"the text is longer than the context of {self.max_model_len} tokens "
                f"could hold ({limit} bytes at most)")
