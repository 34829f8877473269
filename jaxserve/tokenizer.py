"""Tokenizers: one interface over Hugging Face `tokenizers` and sentencepiece.

A converted checkpoint directory holds `tokenizer.json` (HF `tokenizers`) or `tokenizer.model`
(sentencepiece), plus our own small `tokenizer_config.json`:

    {"jaxserve_tokenizer_format": 1, "backend": "tokenizers" | "sentencepiece",
     "bos_token_id": 1 | null, "eos_token_ids": [2, ...], "add_bos": false,
     "chat_template": "..." | null, "special_tokens": {"bos_token": "<s>", ...}}

`special_tokens` are the strings a chat template sees as `bos_token`, `eos_token`, ...
The converters below write both files from GGUF metadata or a Hugging Face model directory.
"""

from __future__ import annotations

import abc
import functools
import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import sentencepiece as spm
import tokenizers
from tokenizers import pre_tokenizers

from jaxserve.errors import CheckpointError

if TYPE_CHECKING:
    import gguf

CONFIG_FILE = "tokenizer_config.json"
HF_FILE = "tokenizer.json"
SPM_FILE = "tokenizer.model"
FORMAT_VERSION = 1
_BACKEND_FILES = {"tokenizers": HF_FILE, "sentencepiece": SPM_FILE}
_TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer(abc.ABC):
    """Text <-> token ids, special tokens and the chat template of one model."""

    def __init__(self, settings: dict[str, Any], vocab_size: int, special_ids: Iterable[int],
                 special_strings: Iterable[str]):
        self.vocab_size: int = vocab_size  # the tokenizer's; a model's embedding may be larger
        self.bos_id: int | None = settings["bos_token_id"]
        self.eos_ids: tuple[int, ...] = tuple(settings["eos_token_ids"])
        self.add_bos: bool = settings["add_bos"]
        self.chat_template: str | None = settings["chat_template"]
        self._template_tokens: dict[str, str] = dict(settings["special_tokens"])
        self._special_ids = frozenset(special_ids)
        strings = sorted(set(special_strings) - {""}, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, strings))) if strings else None

    @abc.abstractmethod
    def _encode_text(self, text: str) -> list[int]:
        """Ids of `text`, special-token strings in it matched whole, no BOS added."""

    @abc.abstractmethod
    def _encode_plain(self, text: str) -> list[int]:
        """Ids of `text` as plain text: special-token strings in it are ordinary text."""

    @abc.abstractmethod
    def _token_strings(self) -> Iterable[str]:
        """The text of every token of the vocabulary."""

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """UTF-8 bytes of the longest token's text: no token stands for more input text."""
        return max(1, max(len(t.encode("utf-8")) for t in self._token_strings()))

    @abc.abstractmethod
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`, leaving out special tokens when asked."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`, with BOS first when `add_special_tokens` and the model wants it."""
        ids = self._encode_text(text)
        if add_special_tokens and self.add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is a control token that `decode` skips."""
        return token_id in self._special_ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation rendered by the chat template, as transformers renders it."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        template = _compile_template(self.chat_template)
        try:
            return template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self._template_tokens,
            )
        except jinja2.exceptions.TemplateError as e:  # raise_exception() or a template bug
            raise ValueError(f"the chat template refused the messages: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    plain_content: bool = False) -> list[int]:
        """Ids of the rendered conversation; the template writes BOS itself if it wants one.

        plain_content: special-token strings inside message content are tokenized as text,
        so content cannot forge a turn. Content without such strings tokenizes exactly as it
        would otherwise. ValueError if the template alters a content holding one.
        """
        text = self.apply_chat_template(messages, add_generation_prompt)
        contents = [m["content"] for m in messages]
        if not (plain_content and self._special_re is not None
                and any(self._special_re.search(c) for c in contents)):
            return self.encode(text, add_special_tokens=False)
        ids: list[int] = []
        pos = 0
        # marked: the contents with a special string, and any that holds marker text
        marked = [bool(self._special_re.search(c) or _MARK_RE.search(c)) for c in contents]
        for a, b in self._content_spans(text, messages, add_generation_prompt, marked):
            ids += self._encode_text(text[pos:a]) + self._encode_plain(text[a:b])
            pos = b
        return ids + self._encode_text(text[pos:])

    def _content_spans(self, text: str, messages: list[dict], add_generation_prompt: bool,
                       chosen: list[bool]) -> list[tuple[int, int]]:
        """Where each chosen message's content sits in `text`, the rendered conversation, in
        order. The template is rendered again with a marker in place of each chosen content,
        so a content is found where the template put it, never where the same string occurs
        earlier (in a default system prompt, say). Verbatim, or stripped of surrounding
        whitespace as some templates do; ValueError if the template changes one otherwise.
        The other messages render as they are in both, so a template may rewrite them (as
        Qwen3's drops the reasoning of earlier assistant turns)."""
        marked = [dict(m, content=_MARK.format(i)) if pick else m
                  for i, (m, pick) in enumerate(zip(messages, chosen, strict=True))]
        parts = _MARK_RE.split(self.apply_chat_template(marked, add_generation_prompt))
        between, order = parts[0::2], [int(i) for i in parts[1::2]]
        if order != [i for i, pick in enumerate(chosen) if pick]:
            raise ValueError(_ALTERED)
        spans, pos = [], 0
        for k, i in enumerate(order):
            if not text.startswith(between[k], pos):
                raise ValueError(_ALTERED)
            pos += len(between[k])
            content = messages[i]["content"]
            for candidate in (content, content.strip()):
                end = pos + len(candidate)
                if text.startswith(candidate, pos) and text.startswith(between[k + 1], end):
                    spans.append((pos, end))
                    pos = end
                    break
            else:
                raise ValueError(_ALTERED)
        if text[pos:] != between[-1]:
            raise ValueError(_ALTERED)
        return spans


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (tokenizer.json)."""

    def __init__(self, backend: tokenizers.Tokenizer, settings: dict[str, Any]):
        added = backend.get_added_tokens_decoder()
        special = [i for i, token in added.items() if token.special]
        super().__init__(settings, backend.get_vocab_size(with_added_tokens=True), special,
                         [token.content for token in added.values() if token.special])
        self._backend = backend
        # A copy that reads special-token strings as text (a flag of the tokenizer object,
        # so it is a separate object: encode runs on several threads).
        self._plain = tokenizers.Tokenizer.from_str(backend.to_str())
        self._plain.encode_special_tokens = True

    def _encode_text(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def _encode_plain(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids

    def _token_strings(self) -> Iterable[str]:
        return self._backend.get_vocab(with_added_tokens=True)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (tokenizer.model).

    Plain text encodes exactly as sentencepiece encodes it (so " hi" keeps both the dummy
    prefix and its own space, where transformers' converted tokenizer keeps one).
    Control and unknown pieces (`<s>`, `</s>`, `<unk>`) written in the text are matched whole,
    as transformers does; text after such a piece gets no dummy-prefix space.
    """

    def __init__(self, model_proto: bytes, settings: dict[str, Any]):
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        # Protobuf merges a repeated sub-message: this sets normalizer_spec.add_dummy_prefix=false.
        no_prefix = model_proto + _pb_bytes(3, _pb_varint(3, 0))
        self._sp_no_prefix = spm.SentencePieceProcessor(model_proto=no_prefix)
        n = self._sp.get_piece_size()
        special = [i for i in range(n) if self._sp.is_control(i) or self._sp.is_unknown(i)]
        super().__init__(settings, n, special, [self._sp.id_to_piece(i) for i in special])
        self._special_pieces = {self._sp.id_to_piece(i): i for i in special}
        # Never empty: sentencepiece refuses a model without an unknown piece.
        alternatives = sorted(self._special_pieces, key=len, reverse=True)
        self._splitter = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    def _encode_text(self, text: str) -> list[int]:
        ids: list[int] = []
        for index, part in enumerate(self._splitter.split(text)):
            if index % 2 == 1:
                ids.append(self._special_pieces[part])
            elif part:
                sp = self._sp if index == 0 else self._sp_no_prefix
                ids.extend(sp.encode(part))
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        return self._sp_no_prefix.encode(text)  # sentencepiece itself never matches them

    def _token_strings(self) -> Iterable[str]:
        return (self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size()))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        # Only the start of the text loses its dummy-prefix space, not a run after `<s>`.
        # Ids past the model's pieces (an embedding padded beyond the tokenizer) decode to
        # nothing, as in the tokenizers backend.
        pieces: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if not 0 <= token_id < self.vocab_size:
                continue
            if not self.is_special(token_id):
                run.append(token_id)
            elif not skip_special_tokens:
                pieces += [self._decode_run(run, first=not pieces), self._sp.id_to_piece(token_id)]
                run = []
        pieces.append(self._decode_run(run, first=not pieces))
        return "".join(pieces)

    def _decode_run(self, ids: list[int], first: bool) -> str:
        return (self._sp if first else self._sp_no_prefix).decode(ids)


# ---------------------------------------------------------------------------- chat templates


# A content's stand-in when the template is rendered to find where contents go (private-use
# characters, which no template writes).
_MARK = "\ue000{}\ue001"
_MARK_RE = re.compile("\ue000(\\d+)\ue001")
_ALTERED = ("the chat template changes message content, so special-token strings in it "
            "cannot be kept as plain text")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant mask): renders the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    """The template in a sandbox set up as transformers sets it up."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


# ---------------------------------------------------------------------------- loading


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer of a converted checkpoint directory."""
    directory = Path(directory)
    settings = _read_settings(directory / CONFIG_FILE)
    path = directory / _BACKEND_FILES[settings["backend"]]
    if not path.is_file():
        raise CheckpointError(f"tokenizer file missing: {path}")
    try:
        if settings["backend"] == "tokenizers":
            tokenizer: Tokenizer = HFTokenizer(tokenizers.Tokenizer.from_file(str(path)), settings)
        else:
            tokenizer = SentencePieceTokenizer(path.read_bytes(), settings)
    except Exception as e:  # `tokenizers` raises a plain Exception on a malformed file
        raise CheckpointError(f"cannot load tokenizer {path}: {e}") from e
    _check_ids(tokenizer, path)
    return tokenizer


def _read_settings(path: Path) -> dict[str, Any]:
    """Our tokenizer_config.json, validated."""
    if not path.is_file():
        raise CheckpointError(f"tokenizer config missing: {path}")
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read tokenizer config {path}: {e}") from e
    version = settings.get("jaxserve_tokenizer_format") if isinstance(settings, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is not a jaxserve tokenizer config ({version=}, want {FORMAT_VERSION}); "
            "convert the checkpoint first"
        )
    required = ("backend", "bos_token_id", "eos_token_ids", "add_bos", "chat_template")
    missing = [key for key in required if key not in settings]
    if missing or settings["backend"] not in _BACKEND_FILES:
        backend = settings.get("backend")
        raise CheckpointError(f"bad tokenizer config {path}: {missing=}, {backend=}")
    settings.setdefault("special_tokens", {})
    return settings


def _check_ids(tokenizer: Tokenizer, path: Path) -> None:
    """Every configured special id is inside the vocabulary."""
    ids = [*tokenizer.eos_ids, *([] if tokenizer.bos_id is None else [tokenizer.bos_id])]
    bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
    if bad:
        raise CheckpointError(f"{path}: special token ids {bad} outside {tokenizer.vocab_size=}")


def _write_settings(out_dir: Path, backend: str, **settings: Any) -> None:
    """Write our tokenizer_config.json."""
    body = {"jaxserve_tokenizer_format": FORMAT_VERSION, "backend": backend, **settings}
    text = json.dumps(body, indent=2, ensure_ascii=False)
    (out_dir / CONFIG_FILE).write_text(text + "\n", encoding="utf-8")


def _unique(ids: Iterable[int | None]) -> list[int]:
    """`ids` without None and repeats, order kept."""
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


# ---------------------------------------------------------------------------- from GGUF

# Split regexes of the pre-tokenizers llama.cpp names in `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_pre() -> pre_tokenizers.PreTokenizer:
    """GPT-2's regex, then bytes to the byte-level alphabet."""
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_gpt2_pre() -> pre_tokenizers.PreTokenizer:
    """StarCoder/SmolLM: every digit on its own, then GPT-2's regex."""
    digits = pre_tokenizers.Digits(individual_digits=True)
    return pre_tokenizers.Sequence([digits, _gpt2_pre()])


def _split_pre(pattern: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    """A model-specific split regex, then bytes to the byte-level alphabet."""
    def build() -> pre_tokenizers.PreTokenizer:
        split = pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        return pre_tokenizers.Sequence([split, byte_level])
    return build


_PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "default": _gpt2_pre,
    "gpt2": _gpt2_pre,
    # As transformers reads SmolLM GGUFs (no separate digit split), the project's reference.
    "smollm": _gpt2_pre,
    "starcoder": _digits_gpt2_pre,
    "llama-bpe": _split_pre(_LLAMA3_SPLIT),
    "llama3": _split_pre(_LLAMA3_SPLIT),
    "qwen2": _split_pre(_QWEN2_SPLIT),
    "deepseek-r1-qwen": _split_pre(_QWEN2_SPLIT),
}
_IGNORE_MERGES = ("llama-bpe", "llama3")  # Llama 3 looks a whole word up before merging
_GGUF_NORMAL, _GGUF_UNKNOWN, _GGUF_CONTROL, _GGUF_USER_DEFINED, _GGUF_BYTE = 1, 2, 3, 4, 6


def write_tokenizer_assets_from_gguf(reader: gguf.GGUFReader, out_dir: Path) -> None:
    """Write tokenizer.json (model "gpt2") or tokenizer.model ("llama") and our config."""
    out_dir, name = Path(out_dir), getattr(reader.data, "filename", "<gguf>")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _gguf(reader, "tokenizer.ggml.model")
    tokens = _gguf(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError(f"{name}: no tokenizer.ggml.tokens")
    types = _gguf(reader, "tokenizer.ggml.token_type") or [_GGUF_NORMAL] * len(tokens)
    if model == "gpt2":
        backend, default_add_bos = "tokenizers", False
        try:
            bpe = _byte_level_bpe(reader, name, tokens, types)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 -- tokenizers raises a bare Exception
            raise CheckpointError(f"{name}: its tokenizer.ggml tokens and merges do not make "
                                  f"a BPE tokenizer: {e}") from None
        bpe.save(str(out_dir / HF_FILE))
    elif model == "llama":
        backend, default_add_bos = "sentencepiece", True
        (out_dir / SPM_FILE).write_bytes(_spm_model_proto(reader, name, tokens, types))
    else:
        raise CheckpointError(f"{name}: unsupported tokenizer.ggml.model {model!r}")
    ids = {key: _gguf(reader, f"tokenizer.ggml.{key}_token_id")
           for key in ("bos", "eos", "eot", "eom", "unknown", "padding")}
    names = zip(_TEMPLATE_TOKENS, ("bos", "eos", "unknown", "padding"), strict=True)
    _write_settings(
        out_dir, backend,
        bos_token_id=ids["bos"],
        eos_token_ids=_unique([ids["eos"], ids["eot"], ids["eom"]]),
        add_bos=bool(_gguf(reader, "tokenizer.ggml.add_bos_token", default_add_bos)),
        chat_template=_gguf(reader, "tokenizer.chat_template"),
        special_tokens={n: tokens[ids[k]] for n, k in names if ids[k] is not None},
    )


def _gguf(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    """The value of a metadata key, or `default` when absent."""
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _byte_level_bpe(reader: gguf.GGUFReader, name: str, tokens: list[str],
                    types: list[int]) -> tokenizers.Tokenizer:
    """A GPT-2 style byte-level BPE tokenizer with the file's vocabulary and merges."""
    pre = _gguf(reader, "tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise CheckpointError(f"{name}: unsupported tokenizer.ggml.pre {pre!r}, "
                              f"supported: {sorted(_PRE_TOKENIZERS)}")
    merges = [tuple(m.split(" ")) for m in _gguf(reader, "tokenizer.ggml.merges", [])]
    if not merges or any(len(m) != 2 for m in merges):
        raise CheckpointError(f"{name}: tokenizer.ggml.merges missing or malformed")
    vocab = {token: i for i, token in enumerate(tokens)}
    bpe = tokenizers.models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _IGNORE_MERGES)
    tokenizer = tokenizers.Tokenizer(bpe)
    tokenizer.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    tokenizer.add_special_tokens(_added(tokens, types, _GGUF_CONTROL, special=True))
    tokenizer.add_tokens(_added(tokens, types, _GGUF_USER_DEFINED, special=False))
    if tokenizer.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise CheckpointError(f"{name}: tokenizer.ggml.tokens has repeated entries")
    return tokenizer


def _added(tokens: list[str], types: list[int], kind: int,
           special: bool) -> list[tokenizers.AddedToken]:
    """Tokens of one GGUF token type, to be matched whole in the text."""
    return [tokenizers.AddedToken(token, special=special, normalized=False)
            for token, token_type in zip(tokens, types, strict=True) if token_type == kind]


def _spm_model_proto(reader: gguf.GGUFReader, name: str, tokens: list[str],
                     types: list[int]) -> bytes:
    """A serialized sentencepiece BPE ModelProto with the file's pieces and scores.

    Written by hand (see `_pb_*`): the generated `sentencepiece_model_pb2` needs a newer
    protobuf runtime than the one this package supports. Field numbers, from
    sentencepiece_model.proto: ModelProto {pieces=1, trainer_spec=2, normalizer_spec=3};
    SentencePiece {piece=1, score=2, type=3}.
    """
    scores = _gguf(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = [t if t else _GGUF_NORMAL for t in types]  # GGUF type numbers equal spm's
    unk = _gguf(reader, "tokenizer.ggml.unknown_token_id")
    unk = types.index(_GGUF_UNKNOWN) if unk is None and _GGUF_UNKNOWN in types else unk
    if unk is None:
        raise CheckpointError(f"{name}: sentencepiece vocabulary without an unknown token")
    types[unk] = _GGUF_UNKNOWN
    pieces = b"".join(
        _pb_bytes(1, _pb_bytes(1, piece.encode()) + _pb_float(2, score) + _pb_varint(3, kind))
        for piece, score, kind in zip(tokens, scores, types, strict=True)
    )
    ids = {"unk": unk, **{k: _gguf(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos")}}
    trainer = _spm_trainer_spec(tokens, ids, byte_fallback=_GGUF_BYTE in types)
    return pieces + _pb_bytes(2, trainer) + _pb_bytes(3, _spm_normalizer_spec(reader))


def _spm_trainer_spec(tokens: list[str], ids: dict[str, int | None], byte_fallback: bool) -> bytes:
    """TrainerSpec {model_type=3 (BPE=2), vocab_size=4, byte_fallback=35,
    unk_id/bos_id/eos_id=40/41/42, unk_piece/bos_piece/eos_piece=45/46/47}."""
    spec = _pb_varint(3, 2) + _pb_varint(4, len(tokens)) + _pb_varint(35, byte_fallback)
    for field, key in ((40, "unk"), (41, "bos"), (42, "eos")):
        token_id = ids[key]
        spec += _pb_varint(field, -1 if token_id is None else token_id)
        if token_id is not None:
            spec += _pb_bytes(field + 5, tokens[token_id].encode())
    return spec


def _spm_normalizer_spec(reader: gguf.GGUFReader) -> bytes:
    """NormalizerSpec {name=1, precompiled_charsmap=2, add_dummy_prefix=3,
    remove_extra_whitespaces=4, escape_whitespaces=5}, as llama.cpp tokenizes."""
    spec = _pb_bytes(1, b"identity")
    charsmap = _gguf(reader, "tokenizer.ggml.precompiled_charsmap")
    if charsmap:
        spec += _pb_bytes(2, bytes(b & 0xFF for b in charsmap))
    spec += _pb_varint(3, _gguf(reader, "tokenizer.ggml.add_space_prefix", True))
    spec += _pb_varint(4, _gguf(reader, "tokenizer.ggml.remove_extra_whitespaces", False))
    return spec + _pb_varint(5, True)


def _varint(value: int) -> bytes:
    """Protobuf base-128 varint; negative int32 as 64-bit two's complement."""
    value = value + (1 << 64) if value < 0 else value
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _pb_varint(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(int(value))


def _pb_float(field: int, value: float) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<f", value)


def _pb_bytes(field: int, data: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(data)) + data


# ---------------------------------------------------------------------------- from Hugging Face


def copy_tokenizer_assets_from_hf(hf_dir: Path, out_dir: Path) -> None:
    """Copy tokenizer.json (or tokenizer.model) from an HF model dir and write our config."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    hf_config = _read_json(hf_dir / CONFIG_FILE)
    generation = _read_json(hf_dir / "generation_config.json")
    model = _read_json(hf_dir / "config.json")
    if (hf_dir / HF_FILE).is_file():
        backend, source = "tokenizers", hf_dir / HF_FILE
        try:
            hf = tokenizers.Tokenizer.from_file(str(source))
        except Exception as e:  # noqa: BLE001 -- tokenizers raises a bare Exception
            raise CheckpointError(f"{source}: not a tokenizer the tokenizers library can "
                                  f"load: {e}") from None
        token_id: Callable[[str], int | None] = hf.token_to_id
    elif (hf_dir / SPM_FILE).is_file():
        backend, source = "sentencepiece", hf_dir / SPM_FILE
        try:
            sp = spm.SentencePieceProcessor(model_file=str(source))
        except (RuntimeError, OSError) as e:
            raise CheckpointError(f"{source}: not a SentencePiece model: {e}") from None
        token_id = lambda text: _spm_piece_id(sp, text)
        _check_no_extra_added(hf_config, sp.get_piece_size(), hf_dir)
    else:
        raise CheckpointError(f"no {HF_FILE} or {SPM_FILE} in {hf_dir}")
    texts = {n: _token_text(hf_config.get(n)) for n in _TEMPLATE_TOKENS}
    special_tokens = {n: t for n, t in texts.items() if t is not None}
    if backend == "sentencepiece":  # LlamaTokenizer's defaults, from the model itself
        for name, piece_id in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id())):
            if name not in special_tokens and piece_id >= 0:
                special_tokens[name] = sp.id_to_piece(piece_id)
    lookup = lambda n: None if n not in special_tokens else token_id(special_tokens[n])
    bos = _first(lookup("bos_token"), generation.get("bos_token_id"), model.get("bos_token_id"))
    eos = _unique([lookup("eos_token"), *_as_list(generation.get("eos_token_id")),
                   *_as_list(model.get("eos_token_id"))])
    add_bos = hf_config.get("add_bos_token")
    if add_bos is None:
        add_bos = backend == "sentencepiece" or _post_processor_adds(hf, bos)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, out_dir / source.name)
    _write_settings(out_dir, backend, bos_token_id=bos, eos_token_ids=eos, add_bos=bool(add_bos),
                    chat_template=_hf_chat_template(hf_dir, hf_config),
                    special_tokens=special_tokens)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot parse {path}: {e}") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _spm_piece_id(sp: spm.SentencePieceProcessor, piece: str) -> int | None:
    """The id of `piece`, None when the model lacks it."""
    token_id = sp.piece_to_id(piece)
    return None if token_id == sp.unk_id() and sp.id_to_piece(token_id) != piece else token_id


def _token_text(value: Any) -> str | None:
    """A special token as HF writes it: a string or a serialized AddedToken."""
    return value.get("content") if isinstance(value, dict) else value


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _as_list(value: int | list[int] | None) -> list[int | None]:
    return list(value) if isinstance(value, list) else [value]


def _post_processor_adds(hf: tokenizers.Tokenizer, bos: int | None) -> bool:
    """Whether tokenizer.json's post-processor puts BOS in front of the text."""
    with_special = hf.encode("a", add_special_tokens=True).ids
    without = hf.encode("a", add_special_tokens=False).ids
    return bos is not None and with_special[:1] == [bos] != without[:1]


def _check_no_extra_added(hf_config: dict[str, Any], vocab_size: int, hf_dir: Path) -> None:
    """tokenizer.model alone cannot carry tokens added on top of it."""
    extra = [int(i) for i in hf_config.get("added_tokens_decoder", {}) if int(i) >= vocab_size]
    if extra:
        raise CheckpointError(f"{hf_dir}: added tokens {extra[:5]} are outside {SPM_FILE} "
                              f"({vocab_size=}) and there is no {HF_FILE}")


def _hf_chat_template(hf_dir: Path, hf_config: dict[str, Any]) -> str | None:
    """chat_template.jinja, else the (default) template in tokenizer_config.json."""
    jinja_file = hf_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = hf_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default")
    return template


# ---------------------------------------------------------------------------- streaming


class IncrementalDetokenizer:
    """Text deltas of generated ids, never ending inside a UTF-8 character.

    Each step decodes a short window of earlier tokens with and without the new one and
    emits where they differ, so sentencepiece's dummy-prefix space and byte-level BPE's
    multi-byte characters come out as in `tokenizer.decode`.

    The window starts on a character boundary. A prompt may end inside a character (ids
    given as such): its text up to the character is the base the first delta starts from,
    so the character comes out whole once generated tokens complete it. A prompt that ends
    in a real U+FFFD character streams nothing of itself again.
    """

    _CONTEXT = 5  # prompt tokens decoded in front of the first generated one
    _CHAR_TOKENS = 4  # a UTF-8 character takes at most 4 bytes, so at most 4 byte tokens

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None,
                 skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prompt_ids or [])
        self._read = len(self._ids)  # ids before this one are emitted (or are the prompt)
        self._prefix = max(self._read - self._CONTEXT, 0)  # window start
        # A window that starts inside a character decodes its first bytes as U+FFFD (a
        # byte-fallback decoder turns the whole run of byte tokens into U+FFFD then): move
        # its start back to the character's first token.
        for _ in range(self._CHAR_TOKENS - 1):
            if self._prefix == 0 or not self._window(self._read).startswith("\ufffd"):
                break
            self._prefix -= 1
        self._prefix_text = self._window(self._read)
        # The prompt's text before a character it leaves unfinished (U+FFFD at its end: an
        # unfinished character, or a real U+FFFD, which the common prefix then keeps).
        end = self._read
        while end > max(self._prefix, self._read - self._CHAR_TOKENS + 1) \
                and self._window(end).endswith("\ufffd"):
            end -= 1
        self._base = self._window(end)
        self._on_boundary = end == self._read  # may the window slide to the read point
        self.text = ""

    def add(self, token_ids: list[int]) -> str:
        """Append ids; the new text they complete (may be empty)."""
        delta = ""
        for token_id in token_ids:
            self._ids.append(token_id)
            full = self._window(len(self._ids))
            if full != self._prefix_text and not full.endswith("\ufffd"):
                delta += self._advance(full)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Emit whatever is held back (an unfinished character comes out as U+FFFD)."""
        full = self._window(len(self._ids))
        delta = self._advance(full) if full != self._prefix_text else ""
        self.text += delta
        return delta

    def _window(self, end: int) -> str:
        return self._tokenizer.decode(self._ids[self._prefix:end], self._skip)

    def _advance(self, full: str) -> str:
        """Emit `full` past the text already out (or the prompt's), and slide the window to
        start at the read point."""
        if full.startswith(self._prefix_text):  # most tokens: one comparison
            common = len(self._prefix_text)
        else:
            common = len(os.path.commonprefix([self._prefix_text, full]))
        if full.startswith(self._base):
            delta = full[max(common, len(self._base)):]
        elif full.endswith("\ufffd"):  # flush: unfinished bytes spoil the window's run of
            delta = self._tokenizer.decode(self._ids[self._read:], self._skip)  # byte tokens
        else:
            delta = full[common:]
        if self._on_boundary:  # else the window keeps the prompt's unfinished character
            self._prefix = self._read
        self._read, self._on_boundary = len(self._ids), True
        self._prefix_text = self._base = self._window(self._read)
        return delta
