"""Compiled step programs saved on disk and loaded whole at the next start
(`engine/program_cache.py`). Each start is a process of its own, as after a restart: JAX
opens its own persistent cache once per process, and that cache decides what is saved."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from engine_checks import save_tiny_shape

from jaxserve.config import Config
from jaxserve.engine import runner
from jaxserve.engine.engine import Engine
from jaxserve.engine.program_cache import INDEX, KEEP, PACKAGES, ProgramCache, tree_digest
from jaxserve.loader import load_model


def tiny_overrides(shape: Path, cache: Path | None) -> dict:
    """Config overrides for the tiny random model of `shape`, its programs saved under
    `cache` (None: not saved)."""
    return {"model__dtype": "float32", "checkpoint__source": "random",
            "checkpoint__random_shape": str(shape), "cache__max_model_len": 64,
            "cache__kv_cache_memory": float(1 << 20), "runner__token_buckets": (16,),
            "runner__seq_buckets": (4,), "scheduler__max_num_seqs": 4,
            "scheduler__max_num_batched_tokens": 16,
            "runner__compilation_cache_dir": None if cache is None else str(cache)}


START = """
import json, sys
from jaxserve.config import Config
from jaxserve.engine.engine import Engine
from jaxserve.engine.request import SamplingParams
from jaxserve.loader import load_model
from sharding.mesh import MeshConfig
overrides = json.loads(sys.argv[1])
mesh = MeshConfig(**overrides.pop("mesh", {}))
config = Config().replace(**{**overrides, "mesh": mesh})
m = load_model(config, progress=False)
engine = Engine(config, m.model_config, m.params, m.tokenizer, m.mesh)
engine.warm_up(progress=False)
params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
for i, ids in enumerate([[5, 9, 17, 33, 2, 71], [8, 8, 41, 3]]):
    engine.add_request(ids, params, f"r{i}")
tokens = {"r0": [], "r1": []}
while engine.has_unfinished():
    for out in engine.step():
        tokens[out.request_id] += out.token_ids
phases = sorted({name for t in engine.runner.compile_times.values() for name in t})
print(json.dumps({"phases": phases, "tokens": tokens}))
"""


class Starts:
    """Starts of a tiny random model in fresh processes, on one cache directory."""

    def __init__(self, tmp_path: Path):
        self.shape = save_tiny_shape(tmp_path / "tiny.json")
        self.cache = tmp_path / "xla"
        self.steps = self.cache / "steps"

    def run(self, **overrides) -> dict:
        overrides = {**tiny_overrides(self.shape, self.cache), **overrides}
        done = subprocess.run([sys.executable, "-c", START, json.dumps(overrides)],
                              timeout=300, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        out = json.loads(done.stdout.strip().splitlines()[-1])
        out["stderr"] = done.stderr
        return out

    def saved(self) -> int:
        """Files saved in the config folders (not counting by-program/'s links to them)."""
        return len([p for p in self.steps.rglob("*.bin") if INDEX not in p.parts])


COMPILED = ["compile", "lower", "trace"]


@pytest.mark.parametrize("mesh", [
    pytest.param({}, id="one-device"),
    pytest.param({"data": 2, "tensor": 2}, id="data2-tensor2",
                 marks=pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices"))])
def test_a_second_start_loads_the_program_and_gives_the_same_tokens(tmp_path, mesh):
    starts = Starts(tmp_path)
    first = starts.run(mesh=mesh)
    assert first["phases"] == COMPILED and starts.saved() == 1
    assert all(len(t) == 6 for t in first["tokens"].values())
    second = starts.run(mesh=mesh)
    assert second["phases"] == ["load"] and second["tokens"] == first["tokens"]


def test_several_saved_programs_load_together_and_give_the_same_tokens(tmp_path):
    """Warm-up loads the saved programs on several threads (Runner._load_saved)."""
    starts = Starts(tmp_path)
    buckets = {"runner__token_buckets": (4, 16), "runner__seq_buckets": (2, 4)}
    first = starts.run(**buckets)
    assert first["phases"] == COMPILED and starts.saved() == 4  # (4, 2) (4, 4) (16, 2) (16, 4)
    second = starts.run(**buckets)
    assert second["phases"] == ["load"] and second["tokens"] == first["tokens"]


def test_other_shapes_or_config_miss_and_a_config_edited_elsewhere_loads_the_same_program(
        tmp_path):
    starts = Starts(tmp_path)
    first = starts.run()
    # more KV pages: other argument shapes, a new program
    assert starts.run(cache__kv_cache_memory=float(1 << 21))["phases"] == COMPILED
    assert starts.saved() == 2
    # another config (a model name, the waiting queue) with the same program: a miss here,
    # and JAX's cache has the program. XLA:CPU does not serialize whole what it loads from
    # there (the copy fails at run time in the next process), so the file the first config
    # saved is linked in, and the next start of this config loads it whole
    for edit in ({"model__name": "tiny-renamed"}, {"scheduler__max_waiting": 7}):
        other = starts.run(**edit)
        assert other["phases"] == COMPILED and other["tokens"] == first["tokens"]
        again = starts.run(**edit)
        assert again["phases"] == ["load"] and again["tokens"] == first["tokens"]
    assert starts.saved() == 4
    # three config folders share the first one's file; by-program/ holds one link per program
    assert len(list((starts.steps / INDEX).glob("*.bin"))) == 2


def test_a_program_only_jax_has_is_compiled_at_each_start_of_a_config_with_no_file(tmp_path):
    """JAX's cache holds a program whose saved file is gone: nothing to link, so each start
    compiles it, as before."""
    starts = Starts(tmp_path)
    first = starts.run()
    shutil.rmtree(starts.steps)
    for _ in range(2):
        other = starts.run(model__name="tiny-renamed")
        assert other["phases"] == COMPILED and other["tokens"] == first["tokens"]
        assert starts.saved() == 0


def test_a_file_that_does_not_load_is_removed_and_compiled_again(tmp_path):
    starts = Starts(tmp_path)
    first = starts.run()
    [saved] = [p for p in starts.steps.rglob("*.bin") if INDEX not in p.parts]
    saved.write_bytes(b"not a program")  # by-program/'s link to it too: the same file
    again = starts.run()
    assert again["phases"] == COMPILED and again["tokens"] == first["tokens"]
    assert "did not load" in again["stderr"] and not saved.exists()
    assert not list((starts.steps / INDEX).glob("*.bin"))  # not linked in again
    for entry in starts.cache.iterdir():  # JAX's own cache emptied: compiled and saved
        if entry != starts.steps:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    assert starts.run()["phases"] == COMPILED and saved.exists()
    loaded = starts.run()
    assert loaded["phases"] == ["load"] and loaded["tokens"] == first["tokens"]


def test_only_the_folders_used_last_are_kept(tmp_path):
    root = tmp_path / "steps"
    for i in range(KEEP + 3):  # old0 used longest ago
        (root / f"old{i}").mkdir(parents=True)
        os.utime(root / f"old{i}", (1e9 + i, 1e9 + i))
    cache = ProgramCache(root, Config(), None, jax.devices()[:1])
    cache.directory.mkdir()
    os.utime(cache.directory, (1e9, 1e9))  # the one in use is kept whatever its time
    cache._prune()
    kept = {p.name for p in root.iterdir()}
    assert kept == {cache.directory.name} | {f"old{i}" for i in range(4, KEEP + 3)}


def test_pruning_removes_the_links_of_the_removed_folders(tmp_path):
    root = tmp_path / "steps"
    (root / INDEX).mkdir(parents=True)
    for i in range(KEEP + 1):  # old0 used longest ago
        (root / f"old{i}").mkdir()
        (root / f"old{i}" / "p.bin").write_bytes(b"%d" % i)
        os.link(root / f"old{i}" / "p.bin", root / INDEX / f"p{i}.bin")
        os.utime(root / f"old{i}", (1e9 + i, 1e9 + i))
    cache = ProgramCache(root, Config(), None, jax.devices()[:1])
    cache.directory.mkdir()
    cache._prune()
    assert {p.name for p in root.iterdir()} == \
        {cache.directory.name, INDEX} | {f"old{i}" for i in range(2, KEEP + 1)}
    # the links of old0 and old1 went with them; by-program/ is not a config folder
    assert sorted(p.name for p in (root / INDEX).iterdir()) == \
        [f"p{i}.bin" for i in range(2, KEEP + 1)]


def test_the_key_covers_the_kernels_cpp_as_well_as_the_python(tmp_path):
    """A program calls the CPU kernels by name: one saved before a kernel's source changed
    must not run against the kernel rebuilt from the new source."""
    for name in PACKAGES:
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "sub" / "step.py").write_text("x = 1\n")
    kernels = tmp_path / "pallas_kernels"
    (kernels / "k.cc").write_text("int f() { return 1; }\n")
    (kernels / "k.h").write_text("int f();\n")
    digests = [tree_digest(tmp_path)]
    for path, text in [(kernels / "k.cc", "int f() { return 2; }\n"),
                       (kernels / "k.h", "int f(void);\n"),
                       (tmp_path / "sharding" / "sub" / "step.py", "x = 2\n")]:
        path.write_text(text)
        digests.append(tree_digest(tmp_path))
    (tmp_path / "jaxserve" / "notes.txt").write_text("not a source\n")
    digests.append(tree_digest(tmp_path))
    assert len(set(digests[:4])) == 4 and digests[4] == digests[3]


def test_the_gpu_step_options_are_options_xla_knows():
    """`step_compiler_options` names XLA debug options: a misspelt one is refused by the
    compile (checked here on this backend), so a GPU start would fail, not ignore it."""
    f = jax.jit(lambda x: x * 2)
    assert runner.step_compiler_options("cpu") == {}
    assert runner.step_compiler_options("cpu", 2048) == {}
    options = runner.step_compiler_options("gpu", runner.CUBLAS_ONLY_MIN_TOKENS - 1)
    assert options == {"xla_disable_hlo_passes": "rematerialization"}
    assert float(f.lower(1.0).compile(options)(1.0)) == 2.0
    # prefill programs: every GEMM on cuBLAS
    options = runner.step_compiler_options("gpu", runner.CUBLAS_ONLY_MIN_TOKENS)
    assert options == {"xla_disable_hlo_passes": "rematerialization",
                       "xla_gpu_enable_triton_gemm": False}
    assert float(f.lower(3.0).compile(options)(3.0)) == 6.0
    with pytest.raises(jax.errors.JaxRuntimeError, match="No such compile option"):
        f.lower(2.0).compile({"xla_disable_hlo_passes_typo": "rematerialization"})


@pytest.mark.parametrize("saved", [False, True], ids=["compiled", "compiled-and-saved"])
def test_step_programs_compile_with_the_step_options(tmp_path, monkeypatch, saved):
    """Both ways a step program is compiled (with and without the program cache) take the
    options: with an option XLA does not know, the first program refuses to compile."""
    monkeypatch.setattr(runner, "step_compiler_options",
                        lambda platform, num_tokens: {"xla_no_such_option_for_this_test": "1"})
    config = Config().replace(**tiny_overrides(save_tiny_shape(tmp_path / "tiny.json"),
                                               tmp_path / "xla" if saved else None))
    m = load_model(config, progress=False)
    engine = Engine(config, m.model_config, m.params, m.tokenizer, m.mesh)
    with pytest.raises(jax.errors.JaxRuntimeError, match="xla_no_such_option_for_this_test"):
        engine.runner.compiled_text(16, 4)
