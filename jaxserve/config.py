"""Deployment configuration: frozen dataclasses read once from a YAML file.

Unknown keys and bad values raise ConfigError naming the file and the key, e.g.
`configs/x.yaml: scheduler.max_num_seqs: must be >= 1 (got 0)`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import types
import typing
from pathlib import Path

import yaml

from jaxserve.errors import ConfigError
from sharding.distributed import DistributedConfig
from sharding.mesh import MeshConfig

DTYPES = ("float32", "bfloat16")
QUANTIZATIONS = ("none", "int8", "fp8", "q8_0")
KV_DTYPES = ("auto", "int8", "fp8")
SPECULATIVE_METHODS = ("none", "ngram", "draft")
CACHE_ENV = "JAXSERVE_CACHE_DIR"  # where downloads, conversions and compilations go


def default_cache_dir() -> str:
    return os.environ.get(CACHE_ENV, "~/.cache/jaxserve")
BACKENDS = ("auto", "pallas", "pallas_flash", "reference")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{key}: {message}")


@dataclasses.dataclass(frozen=True)
class ModelSection:
    name: str = "model"
    dtype: str = "bfloat16"  # compute and parameter dtype: float32 | bfloat16
    # Weight-only quantization of the linear layers: none | int8 | fp8 | q8_0 (int8 in
    # blocks of 32, GGUF Q8_0's layout; models/quant.py).
    # A full-precision checkpoint is quantized as it loads; one converted with
    # `jaxserve convert --quantize` loads as stored, and must match.
    quantization: str = "none"

    def __post_init__(self):
        _check(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES} (got {self.dtype!r})")
        _check(self.quantization in QUANTIZATIONS, "quantization",
               f"must be one of {QUANTIZATIONS} (got {self.quantization!r})")


@dataclasses.dataclass(frozen=True)
class TokenizerSection:
    # Special-token strings inside chat message content are plain text (they cannot open or
    # close a turn); true lets trusted callers write control tokens in content.
    special_tokens_in_content: bool = False


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    # `demo` (the embedded SmolLM2-135M-Instruct), a .gguf file, a Hugging Face directory,
    # a converted jaxserve checkpoint directory, or `random` (random weights, for benchmarks).
    source: str = "demo"
    # Where the converted checkpoint lives; default: cache_dir/checkpoints/<name>-<identity>,
    # so that another source (or the same file changed) converts anew.
    path: str | None = None
    cache_dir: str = dataclasses.field(default_factory=default_cache_dir)  # $JAXSERVE_CACHE_DIR
    random_shape: str | None = None  # for source=random: a model_config.json to take shapes from

    def converted_path(self, model_name: str, identity: str) -> Path:
        base = self.path or os.path.join(self.cache_dir, "checkpoints",
                                         f"{model_name}-{identity[:12]}")
        return Path(os.path.expanduser(base))


@dataclasses.dataclass(frozen=True)
class CacheSection:
    page_size: int = 16
    # Bytes (an int > 1) for the KV page pool, or a fraction in (0, 1] of free device memory.
    # null: 0.9 of free memory where devices report it (GPUs), else 1 GiB per device (CPU).
    kv_cache_memory: float | None = None
    max_model_len: int = 2048
    # auto: pages in the model dtype; int8 | fp8: pages quantized, with a float32 scale per
    # (token, KV head) (models/quant.py), about half the bytes of bfloat16.
    kv_dtype: str = "auto"
    # int8 | fp8 pages: rotate K, V and Q by an orthonormal Hadamard matrix before K and V
    # are rounded (and the attention output back), which spreads each vector's outlier
    # channels over all of them; attention is unchanged up to the rounding
    # (docs/quantization.md). Needs a head_dim that is a power of two.
    kv_rotation: bool = False

    def __post_init__(self):
        _check(self.page_size >= 1, "page_size", f"must be >= 1 (got {self.page_size})")
        _check(self.kv_dtype in KV_DTYPES, "kv_dtype",
               f"must be one of {KV_DTYPES} (got {self.kv_dtype!r})")
        _check(not self.kv_rotation or self.kv_dtype != "auto", "kv_rotation",
               "rotates the vectors of a quantized cache: it needs kv_dtype int8 or fp8 "
               "(got auto)")
        _check(self.kv_cache_memory is None or 0 < self.kv_cache_memory <= 1
               or (self.kv_cache_memory > 1 and float(self.kv_cache_memory).is_integer()),
               "kv_cache_memory",
               f"must be a whole byte count or a fraction in (0, 1] (got "
               f"{self.kv_cache_memory})")
        _check(self.max_model_len >= 2, "max_model_len", f"must be >= 2 (got {self.max_model_len})")


@dataclasses.dataclass(frozen=True)
class SchedulerSection:
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 256  # per-step token budget (prefill chunks + decodes)
    chunked_prefill: bool = True
    max_waiting: int = 1024  # waiting-queue bound; the server answers RESOURCE_EXHAUSTED beyond
    # Multi-step decode: while every running request decodes and no waiting one could be
    # admitted, one device call runs up to this many decode steps (engine/decode_loop.py).
    # 1 turns it off. Tokens then stream in bursts of up to this many per request.
    decode_steps: int = 1

    def __post_init__(self):
        _check(self.max_num_seqs >= 1, "max_num_seqs", f"must be >= 1 (got {self.max_num_seqs})")
        _check(self.decode_steps >= 1, "decode_steps", f"must be >= 1 (got {self.decode_steps})")
        _check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens",
               f"must be >= 1 (got {self.max_num_batched_tokens})")
        _check(self.max_waiting >= 1, "max_waiting", f"must be >= 1 (got {self.max_waiting})")


@dataclasses.dataclass(frozen=True)
class SpeculativeSection:
    """Speculative decoding (engine/speculative.py): propose `num_tokens` tokens per step and
    verify them in the same ragged step."""

    method: str = "none"  # none | ngram (prompt lookup) | draft (a draft model)
    num_tokens: int = 4  # proposed tokens per step (k)
    ngram_min: int = 2  # shortest suffix matched against the context
    ngram_max: int = 4  # longest suffix tried first
    draft_config: str | None = None  # method: draft -- the draft model's jaxserve config
    # A request stops speculating when, over its last `window` steps, fewer than
    # `min_accepted` proposed tokens per step were accepted.
    min_accepted: float = 0.5
    window: int = 16

    def __post_init__(self):
        _check(self.method in SPECULATIVE_METHODS, "method",
               f"must be one of {SPECULATIVE_METHODS} (got {self.method!r})")
        _check(1 <= self.num_tokens <= 16, "num_tokens",
               f"must be in [1, 16] (got {self.num_tokens})")
        _check(1 <= self.ngram_min <= self.ngram_max, "ngram_min",
               f"must be >= 1 and <= ngram_max (got {self.ngram_min}, {self.ngram_max})")
        _check(self.method != "draft" or bool(self.draft_config), "draft_config",
               "method: draft needs the draft model's jaxserve config")
        _check(self.window >= 1, "window", f"must be >= 1 (got {self.window})")
        _check(self.min_accepted >= 0, "min_accepted",
               f"must be >= 0 (got {self.min_accepted})")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def rows(self) -> int:
        """Tokens sampled per sequence per step: the proposed ones and one more."""
        return 1 + self.num_tokens if self.enabled else 1


@dataclasses.dataclass(frozen=True)
class RunnerSection:
    token_buckets: tuple[int, ...] = (16, 64, 256)
    seq_buckets: tuple[int, ...] = (4, 16)
    attention_backend: str = "auto"
    compilation_cache_dir: str | None = dataclasses.field(
        default_factory=lambda: os.path.join(default_cache_dir(), "xla"))
    max_logprobs: int = 20
    scan_unroll: int = 1  # decoder layers per loop iteration; more = bigger, faster code
    layer_arrays: bool = False  # each layer's weights as arrays of their own (see README)
    layer_loop: bool = False  # with layer_arrays: one loop body runs every layer (README)
    transposed_weights: bool = False  # with layer_arrays: linear weights outputs-first (README)
    # with fp8 weights outputs-first: programs of 128+ tokens multiply fp8 activations (README)
    fp8_activations: bool = False
    # with int8 weights outputs-first: programs of 2+ tokens multiply int8 activations (README)
    int8_activations: bool = False
    q8_0_tiles: bool = False  # with layer_arrays: q8_0 weights in column tiles for a GPU (README)
    # float32 decode attention, and matmuls of 1-16 rows with transposed_weights, by the
    # CPU kernels; null = on a CPU that runs them (README)
    cpu_kernels: bool | None = None
    # later chunks of 128+ tokens on the Mosaic kernel: null = where it can run (README)
    paged_prefill: bool | None = None
    # the compiled step's calls made by a thread of their own: null = on a GPU (README)
    dispatch_thread: bool | None = None
    # steps whose sequences each compute one token run programs that launch the decode
    # attention alone: null = where the Pallas attention serves, with one pipeline stage
    # (README)
    decode_programs: bool | None = None

    def __post_init__(self):
        _check(self.scan_unroll >= 1, "scan_unroll", f"must be >= 1 (got {self.scan_unroll})")
        _check(self.layer_arrays or not self.layer_loop, "layer_loop",
               "needs runner.layer_arrays: true (it runs per-layer weight arrays)")
        _check(self.layer_arrays or not self.transposed_weights, "transposed_weights",
               "needs runner.layer_arrays: true (it transposes per-layer weight arrays)")
        _check(self.layer_arrays or not self.q8_0_tiles, "q8_0_tiles",
               "needs runner.layer_arrays: true (it tiles per-layer weight arrays)")
        _check(self.transposed_weights or not self.fp8_activations, "fp8_activations",
               "needs runner.transposed_weights: true (fp8 x fp8 GEMMs take the weights "
               "outputs-first)")
        _check(self.transposed_weights or not self.int8_activations, "int8_activations",
               "needs runner.transposed_weights: true (the s8 x s8 matmuls take the weights "
               "outputs-first)")
        for key in ("token_buckets", "seq_buckets"):
            buckets = getattr(self, key)
            _check(len(buckets) > 0 and all(b >= 1 for b in buckets), key,
                   f"must be a non-empty list of positive ints (got {list(buckets)})")
            _check(list(buckets) == sorted(set(buckets)), key,
                   f"must be strictly increasing (got {list(buckets)})")
        _check(self.attention_backend in BACKENDS, "attention_backend",
               f"must be one of {BACKENDS} (got {self.attention_backend!r})")
        _check(self.max_logprobs >= 0, "max_logprobs", f"must be >= 0 (got {self.max_logprobs})")
        _check(self.paged_prefill is not True
               or self.attention_backend in ("auto", "pallas_flash"),
               "paged_prefill", "true needs attention_backend auto or pallas_flash (got "
               f"{self.attention_backend!r})")


MIN_MESSAGE_BYTES = 4096
# gRPC holds message sizes as int32, and the server lets twice the limit reach its handlers.
MAX_MESSAGE_BYTES = (2**31 - 1) // 2


@dataclasses.dataclass(frozen=True)
class ServerSection:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = 9400
    grace_period_s: float = 30.0
    max_message_bytes: int = 16 * 1024 * 1024
    tls_cert: str | None = None
    tls_key: str | None = None
    auth_token: str | None = None

    def __post_init__(self):
        _check(self.host == self.host.strip() and self.host != "", "host",
               f"must be a host name or an IP address with no spaces (got {self.host!r})")
        _check(":" not in self.host or _is_ipv6(self.host), "host",
               f"{self.host!r} is not an IP address or a host name; a port goes in "
               "server.port")
        _check(0 <= self.port < 65536, "port", f"must be in [0, 65535] (got {self.port})")
        _check(self.metrics_port is None or 0 <= self.metrics_port < 65536, "metrics_port",
               f"must be in [0, 65535] or null (got {self.metrics_port})")
        _check(not self.port or self.metrics_port != self.port, "metrics_port",
               f"must differ from server.port (both {self.port}): the metrics are served "
               "over HTTP on a port of their own")
        _check((self.tls_cert is None) == (self.tls_key is None), "tls_cert",
               "tls_cert and tls_key must be given together")
        _check(self.grace_period_s >= 0, "grace_period_s",
               f"must be >= 0 seconds (got {self.grace_period_s})")
        _check(self.max_message_bytes >= MIN_MESSAGE_BYTES, "max_message_bytes",
               f"must be >= {MIN_MESSAGE_BYTES} (got {self.max_message_bytes}): it bounds "
               "every request and response, health checks included")
        _check(self.max_message_bytes <= MAX_MESSAGE_BYTES, "max_message_bytes",
               f"must be <= {MAX_MESSAGE_BYTES} (got {self.max_message_bytes}): gRPC "
               "holds message sizes in 32 bits, and twice this reaches the server")


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelSection = ModelSection()
    tokenizer: TokenizerSection = TokenizerSection()
    checkpoint: CheckpointSection = CheckpointSection()
    cache: CacheSection = CacheSection()
    scheduler: SchedulerSection = SchedulerSection()
    runner: RunnerSection = RunnerSection()
    mesh: MeshConfig = MeshConfig()
    server: ServerSection = ServerSection()
    distributed: DistributedConfig = DistributedConfig()
    speculative: SpeculativeSection = SpeculativeSection()

    def __post_init__(self):
        _check(self.scheduler.max_num_seqs <= self.runner.seq_buckets[-1],
               "scheduler.max_num_seqs",
               f"({self.scheduler.max_num_seqs}) must be <= the largest runner.seq_buckets "
               f"({self.runner.seq_buckets[-1]})")
        _check(self.scheduler.max_num_batched_tokens <= self.runner.token_buckets[-1],
               "scheduler.max_num_batched_tokens",
               f"({self.scheduler.max_num_batched_tokens}) must be <= the largest "
               f"runner.token_buckets ({self.runner.token_buckets[-1]})")
        _check(not self.speculative.enabled or self.mesh.pipeline == 1, "speculative.method",
               f"{self.speculative.method} needs mesh.pipeline: 1 (got {self.mesh.pipeline}): "
               "a verified step's tokens must be read back before the next step")
        _check(not self.runner.fp8_activations or self.model.quantization == "fp8",
               "runner.fp8_activations",
               f"needs model.quantization: fp8 (got {self.model.quantization!r}): only fp8 "
               "weights multiply fp8 activations")
        _check(not self.runner.int8_activations or self.model.quantization == "int8",
               "runner.int8_activations",
               f"needs model.quantization: int8 (got {self.model.quantization!r}): only int8 "
               "weights multiply int8 activations")
        _check(not self.runner.q8_0_tiles or self.model.quantization == "q8_0",
               "runner.q8_0_tiles",
               f"needs model.quantization: q8_0 (got {self.model.quantization!r}): it tiles "
               "q8_0 weights only")
        _check(self.runner.decode_programs is not True or self.mesh.pipeline == 1,
               "runner.decode_programs",
               f"true needs mesh.pipeline: 1 (got {self.mesh.pipeline}): a pipeline step "
               "runs several micro-batches in one program")
        _check(self.scheduler.decode_steps == 1 or (self.mesh.pipeline == 1
                                                    and not self.speculative.enabled),
               "scheduler.decode_steps",
               f"({self.scheduler.decode_steps}) needs mesh.pipeline: 1 and speculative "
               "decoding off: several steps in one call sample each token on the device")

    def replace(self, **sections) -> Config:
        """A copy with whole sections or `section__field=value` overrides."""
        updates: dict = {}
        fields: dict[str, dict] = {}  # a section's fields change together, checked once
        for key, value in sections.items():
            if "__" in key:
                section, field = key.split("__", 1)
                fields.setdefault(section, {})[field] = value
            else:
                updates[key] = value
        for section, changed in fields.items():
            updates[section] = dataclasses.replace(updates.get(section, getattr(self, section)),
                                                   **changed)
        return dataclasses.replace(self, **updates)


def _is_ipv6(host: str) -> bool:
    """An IPv6 address, bare or in brackets ([::1])."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False


_DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _number(value: str):
    """A number YAML left as text: PyYAML reads 1e9 (no dot, no sign in the exponent) as
    a string. Returns the number, or None when the text is not a finite decimal one."""
    if not _DECIMAL.fullmatch(value) or not math.isfinite(number := float(value)):
        return None
    return int(number) if number.is_integer() and abs(number) < 2**63 else number


def _coerce(value, hint, key: str):
    """Check a YAML value against a field's type hint; tuples come from YAML lists."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{key}: expected a list (got {value!r})")
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        return tuple(_coerce(v, item, key) for v in value)
    if hint in (int, float) and isinstance(value, str) \
            and (number := _number(value)) is not None:
        value = number  # 1e9: YAML's text, meant as a number
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    raise ValueError(f"{key}: expected {getattr(hint, '__name__', hint)} (got {value!r})")


def _build_section(cls, data, section: str):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ValueError(f"{section}: expected a mapping (got {data!r})")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(data) - fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ValueError(f"{section}.{unknown[0]}: unknown key (known: {known})")
    kwargs = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"{section}.{e}") from None


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    try:
        if not isinstance(data, dict):
            raise ValueError(f"top level: expected a mapping (got {type(data).__name__})")
        hints = typing.get_type_hints(Config)
        unknown = sorted(map(str, set(data) - set(hints)))
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown section (known: {', '.join(hints)})")
        sections = {name: _build_section(hints[name], data.get(name), name) for name in hints}
        # The compiled programs go beside the checkpoints unless placed themselves.
        if "cache_dir" in (data.get("checkpoint") or {}) \
                and "compilation_cache_dir" not in (data.get("runner") or {}):
            sections["runner"] = dataclasses.replace(
                sections["runner"], compilation_cache_dir=os.path.join(
                    sections["checkpoint"].cache_dir, "xla"))
        return Config(**sections)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error: with the plain
    loader the last one wins silently (a second `cache:` section replaced the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base`: its keys may be given again, to override them
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                break  # the loader's own error says so
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def make_dir(path, key: str) -> str:
    """Create a directory the config names (its path, ~ expanded), or say which setting
    names one that cannot be."""
    expanded = os.path.expanduser(path)
    try:
        os.makedirs(expanded, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{key}: cannot create {path}: {e.strerror}") from None
    return expanded


def load_config(path: str | os.PathLike) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), _UniqueKeyLoader) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e}") from None
    except yaml.YAMLError as e:  # one line: where, and what
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError(f"{path}: invalid YAML{where}: {what}") from None
    return config_from_dict(data, str(path))
