"""Compiled step programs saved on disk and loaded whole at the next start
(`engine/program_cache.py`)."""

import logging

import jax
import pytest

from jaxserve.engine.engine import Engine
from jaxserve.engine.program_cache import KEEP, ProgramCache
from jaxserve.engine.request import SamplingParams
from jaxserve.loader import load_model
from jaxserve.models.model_config import ModelConfig
from sharding.mesh import MeshConfig

PROMPTS = [[5, 9, 17, 33, 2, 71], [8, 8, 41, 3]]


def tiny_config(tmp_path, demo_config):
    shape = tmp_path / "tiny.json"
    ModelConfig("llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                num_heads=2, num_kv_heads=1, head_dim=16, name="tiny").save(shape)
    return demo_config.replace(
        model__dtype="float32", checkpoint__source="random", checkpoint__random_shape=str(shape),
        cache__max_model_len=64, cache__kv_cache_memory=float(1 << 20),
        runner__token_buckets=(16,), runner__seq_buckets=(4,), scheduler__max_num_seqs=4,
        scheduler__max_num_batched_tokens=16,
        runner__compilation_cache_dir=str(tmp_path / "xla"))


def start(config) -> Engine:
    m = load_model(config, progress=False)
    engine = Engine(config, m.model_config, m.params, m.tokenizer, m.mesh)
    engine.warm_up(progress=False)
    return engine


def greedy(engine: Engine) -> dict[str, list[int]]:
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for i, ids in enumerate(PROMPTS):
        engine.add_request(ids, params, f"r{i}")
    tokens = {f"r{i}": [] for i in range(len(PROMPTS))}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    return tokens


def phases(engine: Engine) -> set[str]:
    return {name for times in engine.runner.compile_times.values() for name in times}


@pytest.mark.parametrize("mesh", [
    pytest.param({}, id="one-device"),
    pytest.param({"data": 2, "tensor": 2}, id="data2-tensor2",
                 marks=pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices"))])
def test_a_second_start_loads_the_programs_and_gives_the_same_tokens(tmp_path, demo_config,
                                                                       mesh):
    config = tiny_config(tmp_path, demo_config).replace(mesh=MeshConfig(**mesh))
    first = start(config)
    assert phases(first) == {"trace", "lower", "compile"}
    want = greedy(first)
    assert all(len(t) == 6 for t in want.values())
    second = start(config)
    assert phases(second) == {"load"}
    assert greedy(second) == want
    saved = list((tmp_path / "xla" / "steps").rglob("*.bin"))
    assert len(saved) == len(second.runner.step_programs())


def test_another_config_or_kv_size_compiles_again(tmp_path, demo_config):
    config = tiny_config(tmp_path, demo_config)
    start(config)
    # more KV pages: the same code, other argument shapes
    assert phases(start(config.replace(cache__kv_cache_memory=float(1 << 21)))) == {
        "trace", "lower", "compile"}
    # a sampler setting the step reads: the same shapes, another config
    assert phases(start(config.replace(scheduler__max_num_seqs=3))) == {
        "trace", "lower", "compile"}


def test_a_file_that_does_not_load_is_compiled_again(tmp_path, demo_config, caplog):
    config = tiny_config(tmp_path, demo_config)
    want = greedy(start(config))
    for path in (tmp_path / "xla" / "steps").rglob("*.bin"):
        path.write_bytes(b"not a program")
    with caplog.at_level(logging.WARNING, logger="jaxserve.engine.program_cache"):
        again = start(config)
    assert phases(again) == {"trace", "lower", "compile"}
    assert "did not load" in caplog.text
    assert greedy(again) == want
    assert phases(start(config)) == {"load"}  # replaced by good files


def test_only_the_folders_used_last_are_kept(tmp_path, demo_config):
    root = tmp_path / "steps"
    for i in range(KEEP + 3):
        (root / f"old{i}").mkdir(parents=True)
    cache = ProgramCache(root, tiny_config(tmp_path, demo_config), None, jax.devices()[:1])
    cache.directory.mkdir()
    cache._prune()
    kept = {p.name for p in root.iterdir()}
    assert len(kept) == KEEP and cache.directory.name in kept


START_AND_GENERATE = """
import json, sys
sys.path.insert(0, sys.argv[2])
from test_program_cache import greedy, phases, start, tiny_config
from jaxserve.config import Config
import pathlib
config = tiny_config(pathlib.Path(sys.argv[1]), Config())
engine = start(config)
print(json.dumps({"phases": sorted(phases(engine)), "tokens": greedy(engine)}))
"""


def test_a_program_jax_had_cached_is_saved_whole(tmp_path):
    """Each start its own process, as after a restart. When JAX's own cache has a program
    and this one does not (a first start after an upgrade), the program saved must still run
    in the next process: XLA:CPU does not serialize whole a program loaded from JAX's cache."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    def run_once() -> dict:
        done = subprocess.run([sys.executable, "-c", START_AND_GENERATE, str(tmp_path),
                               str(Path(__file__).parent)], check=True, timeout=300,
                              capture_output=True, text=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = run_once()
    assert first["phases"] == ["compile", "lower", "trace"]
    shutil.rmtree(tmp_path / "xla" / "steps")  # JAX's cache keeps them; this one does not
    again = run_once()
    assert again["phases"] == ["compile", "lower", "trace"]
    loaded = run_once()
    assert loaded == {"phases": ["load"], "tokens": first["tokens"]}
