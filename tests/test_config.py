"""YAML configs: every shipped file loads; bad keys and values name the file and key."""

import pathlib

import pytest

from jaxserve.config import Config, config_from_dict, load_config
from jaxserve.errors import ConfigError

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    assert isinstance(load_config(path), Config)


def test_demo_config_values():
    c = load_config(CONFIGS[0].parent / "smollm2-135m-cpu.yaml")
    assert (c.checkpoint.source, c.model.dtype, c.cache.page_size) == ("demo", "float32", 16)
    assert c.runner.token_buckets == (1, 4, 16, 64, 128, 256, 512, 1024, 2048)
    assert c.runner.seq_buckets == (1, 4, 16)


@pytest.mark.parametrize(("text", "message"), [
    ("cache:\n  pagesize: 3\n", "cache.pagesize: unknown key"),
    ("caches: {}\n", "caches: unknown section"),
    ("scheduler:\n  max_num_seqs: 0\n", "scheduler.max_num_seqs: must be >= 1"),
    ("runner:\n  token_buckets: [64, 16]\n", "runner.token_buckets: must be strictly increasing"),
    ("runner:\n  attention_backend: cuda\n", "runner.attention_backend: must be one of"),
    ("runner:\n  attention_backend: pallas\n  paged_prefill: true\n",
     "runner.paged_prefill: true needs attention_backend auto or pallas_flash (got 'pallas')"),
    ("runner:\n  layer_arrays: true\n  fp8_activations: true\n",
     "runner.fp8_activations: needs runner.transposed_weights: true"),
    ("runner:\n  layer_arrays: true\n  transposed_weights: true\n  fp8_activations: true\n",
     "runner.fp8_activations: needs model.quantization: fp8 (got 'none')"),
    ("runner:\n  layer_arrays: true\n  int8_activations: true\n",
     "runner.int8_activations: needs runner.transposed_weights: true"),
    ("model:\n  quantization: fp8\nrunner:\n  layer_arrays: true\n  transposed_weights: true\n"
     "  int8_activations: true\n",
     "runner.int8_activations: needs model.quantization: int8 (got 'fp8')"),
    ("runner:\n  layer_arrays: true\n  q8_0_tiles: true\n",
     "runner.q8_0_tiles: needs model.quantization: q8_0 (got 'none')"),
    ("model:\n  dtype: float64\n", "model.dtype: must be one of"),
    ("cache:\n  page_size: big\n", "cache.page_size: expected int"),
    ("mesh:\n  tensor: 0\n", "mesh.tensor: must be >= 1"),
    ("distributed:\n  step_port: 70000\n", "distributed.step_port: 70000 is not a TCP port"),
    ("server:\n  tls_cert: a.pem\n", "server.tls_cert: tls_cert and tls_key"),
    ("scheduler:\n  max_num_seqs: 64\n", "scheduler.max_num_seqs: (64) must be <="),
    ("- a\n- b\n", "top level: expected a mapping"),
    ("model: [1\n",
     "invalid YAML at line 2, column 1: expected ',' or ']', but got '<stream end>'"),
    ("cache:\n  kv_cache_memory: 1.5\n",
     "cache.kv_cache_memory: must be a whole byte count or a fraction in (0, 1] (got 1.5)"),
    ("cache:\n  kv_cache_memory: 0\n", "cache.kv_cache_memory: must be a whole byte count"),
    ("cache:\n  kv_cache_memory: -4096\n", "cache.kv_cache_memory: must be a whole byte"),
    ("server:\n  grace_period_s: -5\n", "server.grace_period_s: must be >= 0 seconds"),
    ("server:\n  max_message_bytes: 0\n", "server.max_message_bytes: must be >= 4096 (got 0)"),
    ("distributed:\n  step_timeout_s: .inf\n", "distributed.init_timeout_s and "
     "step_timeout_s: must be at most 604800 s (got 60 and inf)"),
    ("distributed:\n  init_timeout_s: 10000000000\n", "must be at most 604800 s"),
    ("server:\n  max_message_bytes: 1073741824\n",
     "server.max_message_bytes: must be <= 1073741823 (got 1073741824): gRPC holds message"),
    ("server:\n  metrics_port: 70000\n", "server.metrics_port: must be in [0, 65535] or null"),
    ("1: a\nfoo: b\n", "1: unknown section"),
    ("cache:\n  1: a\n  foo: b\n", "cache.1: unknown key"),
    ("cache:\n  page_size: 16\n# caf\xe9\n", "not UTF-8 text"),
    # a second section (or key) of the same name silently replaced the first
    ("cache:\n  kv_cache_memory: 268435456\ncache:\n  max_model_len: 4096\n",
     "invalid YAML at line 3, column 1: 'cache' is given twice in one mapping"),
    ("cache: {page_size: 16, page_size: 32}\n", "'page_size' is given twice"),
    ("server:\n  host: localhost:50181\n",
     "server.host: 'localhost:50181' is not an IP address or a host name; a port goes in "
     "server.port"),
    ("server:\n  host: '127.0.0.1 '\n", "server.host: must be a host name or an IP address "
     "with no spaces"),
    ("server:\n  port: 50171\n  metrics_port: 50171\n",
     "server.metrics_port: must differ from server.port (both 50171)"),
    ("cache:\n  kv_cache_memory: 1e400\n", "cache.kv_cache_memory: expected float"),
    ("cache:\n  page_size: 1.6e1x\n", "cache.page_size: expected int (got '1.6e1x')"),
])
def test_bad_configs_name_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text.encode("latin-1"))  # latin-1: one byte per character, not UTF-8
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: ")
    assert message in str(e.value)
    assert "\n" not in str(e.value)  # one line


def test_yaml_merge_keys_still_merge_and_unhashable_keys_are_a_yaml_error(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("server:\n  <<: {port: 50052, host: 0.0.0.0}\n  port: 50053\n")
    c = load_config(path)
    assert (c.server.port, c.server.host) == (50053, "0.0.0.0")
    path.write_text("server:\n  ? [a, b]\n  : 1\n")
    with pytest.raises(ConfigError, match="invalid YAML at line 2, column 5: found unhashable"):
        load_config(path)


def test_numbers_yaml_reads_as_text_are_numbers(tmp_path):
    """YAML 1.1 reads 1e9 (no dot, no signed exponent) as text; it means a number."""
    path = tmp_path / "sci.yaml"
    path.write_text("cache:\n  kv_cache_memory: 1e9\n  page_size: 3.2E1\n"
                    "server:\n  host: '[::1]'\n  grace_period_s: 5e0\n")
    c = load_config(path)
    assert (c.cache.kv_cache_memory, c.cache.page_size) == (1e9, 32)
    assert type(c.cache.page_size) is int
    assert (c.server.host, c.server.grace_period_s) == ("[::1]", 5.0)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_compiled_programs_go_beside_the_checkpoints_unless_placed(tmp_path):
    config = config_from_dict({"checkpoint": {"cache_dir": str(tmp_path)}})
    assert config.runner.compilation_cache_dir == str(tmp_path / "xla")
    placed = config_from_dict({"checkpoint": {"cache_dir": str(tmp_path)},
                               "runner": {"compilation_cache_dir": None}})
    assert placed.runner.compilation_cache_dir is None


def test_the_cache_directory_follows_jaxserve_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXSERVE_CACHE_DIR", str(tmp_path))
    demo = load_config(pathlib.Path(__file__).parent.parent / "configs" / "smollm2-135m-cpu.yaml")
    assert demo.checkpoint.cache_dir == str(tmp_path)
    assert demo.runner.compilation_cache_dir == str(tmp_path / "xla")
