"""Tests for jaxserve.tokenizer: both backends, both converters, chat templates, streaming."""

from __future__ import annotations

import io
import json
from pathlib import Path

import gguf
import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, pre_tokenizers, processors, trainers

from jaxserve.errors import CheckpointError
from jaxserve.tokenizer import (
    IncrementalDetokenizer,
    Tokenizer,
    copy_tokenizer_assets_from_hf,
    load_tokenizer,
    write_tokenizer_assets_from_gguf,
)

WORDS = (
    "the quick brown fox jumps over the lazy dog hello world tokenizer model serving "
    "inference engine café naïve 2024 365 def return print(x) for in range:"
).split()
CORPUS = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)) for i in range(300)]
CORPUS += ["def f(x):\n    return x  + 1  # two  spaces"] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
STRINGS = [
    "hello world", " hello world", "hello  world ", "  ", "\n\n", "The quick brown fox 2024!",
    "x  1", "a   22 333", "café naïve façade", "日本語 テキスト", "emoji 🎉👍🏽 end", "ж and ش",
    "def f(x):\n    return x ** 2\n", "tabs\tand\r\nnewlines", "don't you'll I'm",
    "<|im_start|>user\nhi<|im_end|>\n", "text<|endoftext|>more", "",
]
STREAM_TEXT = "Hi 🎉 there 日本語 👨\u200d👩\u200d👧 ok ж!"
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------- fixtures


def _write_gguf(path: Path, **keys) -> gguf.GGUFReader:
    """A GGUF file with only tokenizer metadata."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model(keys.pop("model"))
    writer.add_token_list(keys.pop("tokens"))
    writer.add_token_types(keys.pop("types"))
    for name, value in keys.items():
        if value is not None:
            getattr(writer, f"add_{name}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(str(path))


@pytest.fixture(scope="module")
def bpe() -> tokenizers.Tokenizer:
    """A small byte-level BPE, pre-tokenized as transformers reads SmolLM GGUFs (GPT-2 regex)."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _vocab_and_merges(tok: tokenizers.Tokenizer) -> tuple[list[str], list[str]]:
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return vocab, merges


@pytest.fixture(scope="module")
def bpe_dir(bpe, tmp_path_factory) -> Path:
    """`bpe` written as a GGUF (model gpt2, pre smollm) and converted."""
    tmp = tmp_path_factory.mktemp("bpe")
    tokens, merges = _vocab_and_merges(bpe)
    types = [3 if t in SPECIALS else 1 for t in tokens]
    reader = _write_gguf(tmp / "bpe.gguf", model="gpt2", tokens=tokens, types=types,
                         token_merges=merges, tokenizer_pre="smollm", bos_token_id=1,
                         eos_token_id=2, unk_token_id=0, chat_template=CHATML)
    write_tokenizer_assets_from_gguf(reader, tmp)
    return tmp


@pytest.fixture(scope="module")
def sp_model() -> bytes:
    """A small sentencepiece BPE model, normalized as Llama's (identity, spaces kept)."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=330, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, user_defined_symbols=["<tool>"], minloglevel=2,
    )
    return buf.getvalue()


@pytest.fixture(scope="module")
def sp(sp_model) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=sp_model)


@pytest.fixture(scope="module")
def sp_hf_dir(sp_model, tmp_path_factory) -> Path:
    """A Hugging Face model directory with only tokenizer.model and its configs."""
    hf = tmp_path_factory.mktemp("sp_hf")
    (hf / "tokenizer.model").write_bytes(sp_model)
    template = [{"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"},
                {"name": "tool_use", "template": "tools"}]
    config = {"bos_token": {"__type": "AddedToken", "content": "<s>"}, "eos_token": "</s>",
              "add_bos_token": True, "chat_template": template}
    (hf / "tokenizer_config.json").write_text(json.dumps(config))
    (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    (hf / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return hf


def _plain(strings: list[str]) -> list[str]:
    """The strings that spell no sentencepiece control piece."""
    return [s for s in strings if not any(p in s for p in ("<s>", "</s>", "<unk>"))]


# ---------------------------------------------------------------------------- byte-level BPE


def test_gguf_bpe_encodes_as_the_original(bpe, bpe_dir):
    tok = load_tokenizer(bpe_dir)
    for text in STRINGS:
        assert tok.encode(text) == bpe.encode(text).ids, text
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_gguf_bpe_settings_and_specials(bpe, bpe_dir):
    tok = load_tokenizer(bpe_dir)
    assert isinstance(tok, Tokenizer)
    settings = (tok.vocab_size, tok.bos_id, tok.eos_ids, tok.add_bos)
    assert settings == (bpe.get_vocab_size(), 1, (2,), False)
    assert tok.chat_template == CHATML
    assert [tok.is_special(i) for i in (0, 1, 2, 3)] == [True, True, True, False]
    ids = tok.encode("a<|im_end|>b")
    assert ids[1] == 2 and len(ids) == 3
    assert tok.decode(ids) == "ab"
    assert tok.decode(ids, skip_special_tokens=False) == "a<|im_end|>b"


def test_smollm_pre_tokenizer_follows_gpt2_regex(bpe_dir):
    """Whitespace before a digit: one space joins the digit run (as transformers reads it)."""
    tok = load_tokenizer(bpe_dir)
    saved = tokenizers.Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    assert [p for p, _ in saved.pre_tokenizer.pre_tokenize_str("x  12")] == ["x", "Ġ", "Ġ12"]
    assert tok.decode(tok.encode("x  12")) == "x  12"


@pytest.mark.parametrize(("pre", "pieces"), [
    ("default", ["Hi", "Ġ12345", "Ġworld"]),
    ("smollm", ["Hi", "Ġ12345", "Ġworld"]),
    ("llama-bpe", ["Hi", "Ġ", "123", "45", "Ġworld"]),
    ("qwen2", ["Hi", "Ġ", "1", "2", "3", "4", "5", "Ġworld"]),
])
def test_gguf_pre_tokenizers(bpe, tmp_path, pre, pieces):
    tokens, merges = _vocab_and_merges(bpe)
    reader = _write_gguf(tmp_path / "t.gguf", model="gpt2", tokens=tokens, types=[1] * len(tokens),
                         token_merges=merges, tokenizer_pre=pre)
    write_tokenizer_assets_from_gguf(reader, tmp_path)
    saved = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert [p for p, _ in saved.pre_tokenizer.pre_tokenize_str("Hi 12345 world")] == pieces


def test_gguf_merges_of_tokens_not_in_its_vocabulary_are_a_checkpoint_error(bpe, tmp_path):
    """The tokenizers library refused them with a bare Exception, a traceback at convert."""
    tokens, merges = _vocab_and_merges(bpe)
    reader = _write_gguf(tmp_path / "t.gguf", model="gpt2", tokens=tokens, types=[1] * len(tokens),
                         token_merges=[*merges, "qq zz"])
    with pytest.raises(CheckpointError, match=r"t.gguf: its tokenizer.ggml tokens and merges "
                                              r"do not make a BPE tokenizer: "):
        write_tokenizer_assets_from_gguf(reader, tmp_path / "out")


def test_gguf_add_bos_and_encode_chat(bpe, tmp_path):
    tokens, merges = _vocab_and_merges(bpe)
    types = [3 if t in SPECIALS else 1 for t in tokens]
    reader = _write_gguf(tmp_path / "t.gguf", model="gpt2", tokens=tokens, types=types,
                         token_merges=merges, bos_token_id=1, eos_token_id=2, eot_token_id=0,
                         add_bos_token=True, chat_template="{{ bos_token }}" + CHATML)
    write_tokenizer_assets_from_gguf(reader, tmp_path)
    tok = load_tokenizer(tmp_path)
    assert (tok.add_bos, tok.eos_ids) == (True, (2, 0))
    assert tok.encode("hello") == [1, *bpe.encode("hello").ids]
    assert tok.encode("hello", add_special_tokens=False) == bpe.encode("hello").ids
    messages = [{"role": "user", "content": "hello"}]
    text = "<|im_start|><|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(messages) == text
    assert tok.encode_chat(messages) == bpe.encode(text).ids  # BOS only from the template
    assert tok.encode_chat(messages)[:2] == [1, 1]


# ---------------------------------------------------------------------------- sentencepiece


def test_hf_sentencepiece_dir(sp, sp_hf_dir, tmp_path):
    copy_tokenizer_assets_from_hf(sp_hf_dir, tmp_path)
    tok = load_tokenizer(tmp_path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids, tok.add_bos) == (330, 1, (2, 3), True)
    assert tok.chat_template == "{{ bos_token }}{{ messages[0]['content'] }}"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>hi"
    for text in _plain(STRINGS):
        assert tok.encode(text) == [1, *sp.encode(text)], text
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text)), text
    assert [tok.is_special(i) for i in (0, 1, 2, 3)] == [True, True, True, False]


def test_sentencepiece_control_pieces_in_text(sp, sp_hf_dir, tmp_path):
    copy_tokenizer_assets_from_hf(sp_hf_dir, tmp_path)
    tok = load_tokenizer(tmp_path)
    no_prefix = lambda text: sp.encode("<tool>" + text)[2:]  # "▁", "<tool>", then text
    assert tok.encode_chat([{"role": "user", "content": "hello"}]) == [1, *no_prefix("hello")]
    expected = [*sp.encode("a "), 2, *no_prefix(" b")]
    assert tok.encode("a </s> b", add_special_tokens=False) == expected
    ids = tok.encode("hello</s> world", add_special_tokens=False)
    assert tok.decode(ids) == "hello world"
    assert tok.decode(ids, skip_special_tokens=False) == "hello</s> world"
    assert tok.decode([1, *sp.encode("hello")], skip_special_tokens=False) == "<s> hello"


def test_gguf_llama_vocab_encodes_as_sentencepiece(sp, tmp_path):
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    kinds = [(sp.is_unknown, 2), (sp.is_control, 3), (sp.is_byte, 6)]
    types = [next((k for check, k in kinds if check(i)), 1) for i in range(n)]
    types[sp.piece_to_id("<tool>")] = 4
    reader = _write_gguf(tmp_path / "spm.gguf", model="llama", tokens=tokens, types=types,
                         token_scores=[sp.get_score(i) for i in range(n)], bos_token_id=1,
                         eos_token_id=2, unk_token_id=0)
    write_tokenizer_assets_from_gguf(reader, tmp_path)
    tok = load_tokenizer(tmp_path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids, tok.add_bos) == (n, 1, (2,), True)
    assert tok.chat_template is None
    for text in [*_plain(STRINGS), "<tool> call", "ж ش 🎉"]:
        assert tok.encode(text) == [1, *sp.encode(text)], text
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text)), text


# ---------------------------------------------------------------------------- from Hugging Face


def test_hf_tokenizer_json_dir(bpe, tmp_path):
    hf, out = tmp_path / "hf", tmp_path / "out"
    hf.mkdir()
    out.mkdir()
    with_bos = tokenizers.Tokenizer.from_str(bpe.to_str())
    with_bos.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    with_bos.save(str(hf / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "chat_template": "old", "unk_token": "<|endoftext|>"}
    (hf / "tokenizer_config.json").write_text(json.dumps(config))
    (hf / "chat_template.jinja").write_text("{{ unk_token }}new")
    (hf / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [0, 2]}))
    copy_tokenizer_assets_from_hf(hf, out)
    tok = load_tokenizer(out)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, (2, 0), True)  # BOS from post-processor
    assert tok.apply_chat_template([]) == "<|endoftext|>new"
    assert tok.encode("hello") == [1, *bpe.encode("hello").ids]


def test_hf_dir_without_tokenizer(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        copy_tokenizer_assets_from_hf(tmp_path, tmp_path)


def test_hf_sentencepiece_with_tokens_beyond_the_model(sp_model, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(sp_model)
    config = {"added_tokens_decoder": {"330": {"content": "<|im_start|>"}}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="330"):
        copy_tokenizer_assets_from_hf(tmp_path, tmp_path / "out")


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("backend", ["bpe", "spm"])
def test_ids_past_the_tokenizer_decode_to_nothing(backend, bpe_dir, sp_hf_dir, tmp_path):
    """A model's embedding may have more rows than its tokenizer has tokens; such an id
    (sampled, or sent to Detokenize) decodes to nothing on both backends."""
    if backend == "spm":
        copy_tokenizer_assets_from_hf(sp_hf_dir, tmp_path)
    tok = load_tokenizer(bpe_dir if backend == "bpe" else tmp_path)
    ids = tok.encode("hello world", add_special_tokens=False)
    beyond = [tok.vocab_size, tok.vocab_size + 7]
    assert tok.decode([*ids[:1], *beyond, *ids[1:]]) == tok.decode(ids) == "hello world"
    deltas, _ = _stream(tok, [*ids, *beyond])
    assert "".join(deltas) == "hello world"


def test_load_errors_name_the_path(bpe_dir, tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "x"}))
    with pytest.raises(CheckpointError, match="not a jaxserve tokenizer config"):
        load_tokenizer(tmp_path)
    ours = json.loads((bpe_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(ours))
    with pytest.raises(CheckpointError, match=str(tmp_path / "tokenizer.json")):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot load tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text((bpe_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**ours, "eos_token_ids": [99999]}))
    with pytest.raises(CheckpointError, match=r"\[99999\]"):
        load_tokenizer(tmp_path)


def test_gguf_unsupported_tokenizers(bpe, tmp_path):
    reader = _write_gguf(tmp_path / "t5.gguf", model="t5", tokens=["a"], types=[1])
    with pytest.raises(CheckpointError, match=r"t5\.gguf.*'t5'"):
        write_tokenizer_assets_from_gguf(reader, tmp_path)
    tokens, merges = _vocab_and_merges(bpe)
    reader = _write_gguf(tmp_path / "p.gguf", model="gpt2", tokens=tokens, types=[1] * len(tokens),
                         token_merges=merges, tokenizer_pre="mystery")
    with pytest.raises(CheckpointError, match="'mystery'"):
        write_tokenizer_assets_from_gguf(reader, tmp_path)


# ---------------------------------------------------------------------------- chat templates


def test_chat_template_renders_like_transformers(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    tok.chat_template = (
        "{{ bos_token }}\n"
        "{% for m in messages %}\n"
        "  {% if m['role'] == 'skip' %}{% continue %}{% endif %}\n"
        "  {% if m['role'] == 'bad' %}"
        "{{ raise_exception('bad role: ' + m['content']) }}{% endif %}\n"
        "[{{ m['role'] }}] {{ m['content'] | tojson }}\n"
        "  {% if loop.index >= 3 %}{% break %}{% endif %}\n"
        "{% endfor %}\n"
        "{% generation %}{% if add_generation_prompt %}[{{ eos_token }}]{% endif %}"
        "{% endgeneration %}"
    )
    messages = [{"role": "user", "content": "héllo <b>"}, {"role": "skip", "content": "x"},
                {"role": "assistant", "content": 'a"b'}, {"role": "user", "content": "late"}]
    assert tok.apply_chat_template(messages) == (
        '<|im_start|>\n[user] "héllo <b>"\n[assistant] "a\\"b"\n[<|im_end|>]'
    )
    assert tok.apply_chat_template(messages[:1], add_generation_prompt=False) == (
        '<|im_start|>\n[user] "héllo <b>"\n'
    )
    with pytest.raises(ValueError, match="bad role: oops"):
        tok.apply_chat_template([{"role": "bad", "content": "oops"}])
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(messages)


# ---------------------------------------------------------------------------- streaming


def _stream(tok: Tokenizer, ids: list[int], **kwargs) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, **kwargs)
    deltas = [detok.add([i]) for i in ids]
    return [*deltas, detok.flush()], detok


@pytest.mark.parametrize("backend", ["bpe", "spm"])
def test_incremental_detokenizer_matches_decode(backend, bpe_dir, sp_hf_dir, tmp_path):
    if backend == "spm":
        copy_tokenizer_assets_from_hf(sp_hf_dir, tmp_path)
    tok = load_tokenizer(bpe_dir if backend == "bpe" else tmp_path)
    assert len(tok.encode("🎉", add_special_tokens=False)) >= 4  # one token per byte
    ids = tok.encode(STREAM_TEXT, add_special_tokens=False)
    deltas, detok = _stream(tok, ids)
    assert "".join(deltas) == detok.text == tok.decode(ids) == STREAM_TEXT
    assert not any("\ufffd" in d for d in deltas)
    assert deltas.count("") >= 3 * 3  # held back while each emoji was incomplete
    # A prompt in front, cut anywhere: the first delta keeps its leading space.
    full = tok.encode("Hi there", add_special_tokens=False)
    for k in range(1, len(full)):
        deltas, _ = _stream(tok, full[k:], prompt_ids=full[:k])
        assert tok.decode(full[:k]) + "".join(deltas) == "Hi there"


def test_incremental_detokenizer_batches_specials_and_flush(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    emoji = tok.encode("🎉")
    detok = IncrementalDetokenizer(tok)
    assert detok.add(tok.encode("ok") + emoji[:2]) == "ok"
    assert detok.add(emoji[2:] + [2]) == "🎉"
    assert detok.flush() == ""
    detok = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert detok.add([2]) == "<|im_end|>"
    assert detok.add(emoji[:1]) == ""
    assert detok.flush() == "\ufffd"
    assert detok.text == "<|im_end|>\ufffd"
    # A prompt that ends inside a character: the character comes out once complete.
    detok = IncrementalDetokenizer(tok, prompt_ids=tok.encode("ok") + emoji[:3])
    assert detok.add(emoji[3:] + tok.encode("!")) == "🎉!"


@pytest.mark.parametrize("backend", ["bpe", "spm"])
def test_a_prompt_ending_in_a_real_replacement_character_is_not_streamed_again(
        backend, bpe_dir, sp_hf_dir, tmp_path):
    """U+FFFD typed in a prompt (pasted mojibake) is a character, not an unfinished one."""
    if backend == "spm":
        copy_tokenizer_assets_from_hf(sp_hf_dir, tmp_path)
    tok = load_tokenizer(bpe_dir if backend == "bpe" else tmp_path)
    for text in ("Caf\ufffd", "Name: Jos\ufffd\ufffd\ufffd\ufffd\ufffd\ufffd"):
        prompt, ok = tok.encode(text), tok.encode(" ok", add_special_tokens=False)
        want = tok.decode(prompt + ok)[len(tok.decode(prompt)):]
        assert want.strip() == "ok"
        deltas, _ = _stream(tok, ok, prompt_ids=prompt)
        assert "".join(deltas) == want


@pytest.fixture(scope="module")
def byte_fallback_dir(tmp_path_factory) -> Path:
    """A tokenizer.json as Llama-2 and Mistral ship it: BPE with byte fallback (<0xNN>
    tokens), decoded by Replace, ByteFallback, Fuse and Strip."""
    from tokenizers import models, normalizers
    bpe = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    bpe.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                           normalizers.Replace(" ", "\u2581")])
    bpe.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    spec = json.loads(bpe.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    hf, out = tmp_path_factory.mktemp("byte_fallback_hf"), tmp_path_factory.mktemp("bf")
    (hf / "tokenizer.json").write_text(json.dumps(spec))
    (hf / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    copy_tokenizer_assets_from_hf(hf, out)
    return out


def test_a_prompt_ending_in_byte_fallback_characters_streams_only_the_answer(
        byte_fallback_dir):
    """The detokenizer's window of the prompt's last tokens may start inside a character;
    a byte-fallback decoder then turns the whole run of byte tokens into U+FFFD, which must
    not reach the stream."""
    tok = load_tokenizer(byte_fallback_dir)
    assert len(tok.encode("\U0001f389", add_special_tokens=False)) >= 4  # byte tokens
    for text, answer in (("Party time \U0001f389\U0001f389", " Yes"),
                         ("Party time \U0001f389", "\U0001f389 ok"),
                         ("Tokyo is \u65e5\u672c\u8a9e", " ok")):
        prompt, both = tok.encode(text), tok.encode(text + answer)
        assert both[:len(prompt)] == prompt
        deltas, _ = _stream(tok, both[len(prompt):], prompt_ids=prompt)
        assert "".join(deltas) == answer
        assert not any("\ufffd" in d for d in deltas)
    # A prompt cut inside its last character (token ids): the character comes out whole.
    ids = tok.encode("x \U0001f389\U0001f389!")
    deltas, _ = _stream(tok, ids[-3:], prompt_ids=ids[:-3])
    assert "".join(deltas) == "\U0001f389!"


# ---------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(tmp_path, demo_gguf):
    write_tokenizer_assets_from_gguf(gguf.GGUFReader(str(demo_gguf)), tmp_path)
    tok = load_tokenizer(tmp_path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids, tok.add_bos) == (49152, 1, (2,), False)
    assert [i for i in range(50) if tok.is_special(i)] == list(range(17))
    # Ids from transformers (AutoTokenizer on the same GGUF).
    expected = {
        "Hello, world!": [19556, 28, 905, 17],
        "日本語のテキスト": [23274, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251,
                       10391, 134, 11100, 226],
        "def f(x):\n    return x ** 2\n": [1604, 275, 24, 104, 727, 472, 1003, 1792, 1903, 216,
                                            34, 198],
        "  leading and trailing  ": [216, 2899, 284, 35079, 256],
        "text<|endoftext|>more": [2692, 0, 3143],
        "The year 2024 had 366 days.": [504, 713, 216, 34, 32, 34, 36, 761, 216, 35, 38, 38,
                                        2009, 30],
    }
    for text, ids in expected.items():
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == text.replace("<|endoftext|>", "")
    # Spaces right before a digit: as transformers' GGUF loader (llama.cpp splits digits
    # first and would give [104, 256, 33]); transformers is this project's reference.
    assert tok.encode("x  1") == [104, 216, 216, 33]
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2+2?"}]
    assert tok.apply_chat_template(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.encode_chat(messages) == [1, 9690, 198, 6077, 5453, 30, 2, 198, 1, 4093, 198, 1780,
                                         314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198]
    text = "emoji: 😀😃😄👍🏽 👨\u200d👩\u200d👧\u200d👦 🏳️\u200d🌈"
    deltas, _ = _stream(tok, tok.encode(text))
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
