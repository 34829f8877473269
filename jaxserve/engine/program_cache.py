"""Compiled step programs kept on disk, so that a warm start skips tracing and lowering too.

JAX's persistent compilation cache (`runner.compilation_cache_dir`) skips XLA's compile, but
it finds a program by its lowered HLO: every start still traces and lowers each step in
Python first, 0.5-0.9 s a program (18 programs for the demo on CPU, most of its warm start).
This cache keys a serialized executable by everything that decides what the step computes,
and loads it without tracing:

* the program's bucket, and the config sections the runner reads (not `server` or
  `distributed`), and the model's shape and options;
* the arguments' structure, shapes, dtypes and shardings (so the number of KV pages too);
* the source of the packages that build the step (`jaxserve`, `sharding`,
  `pallas_kernels`: their Python, and the C++ of the CPU kernels a program calls), JAX's and
  jaxlib's versions, the devices and `XLA_FLAGS`.

A change to any of these misses and compiles as before. A config edited where its programs
are not (a model's name, `scheduler.max_waiting`) compiles the same programs: JAX's cache
holds them, and what it loads does not serialize whole on XLA:CPU, so the file saved by the
config that compiled each one is linked in instead (`compile_and_save`; `by-program/` holds a
hard link to every saved file, named by its lowered program). One process only: over several
processes every process must take part in each compile. A file that does not load (torn,
or from an incompatible build) is removed and the program compiled, with one warning.

Loading a file runs what it holds (pickle and an executable), as JAX's own cache does:
the folder must be as trusted as the code, like `~/.cache` is.

Programs are grouped in a folder per everything but the bucket and the arguments; the
`KEEP` folders used last stay and older ones are removed (and the links of `by-program/` that
no kept folder shares), so upgrades and edited configs do not pile up compiled programs.
Files are zlib-compressed (about 6x for XLA's CPU code).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import shutil
import zlib
from pathlib import Path

import jax
import jaxlib
from jax.experimental import serialize_executable

log = logging.getLogger(__name__)

PACKAGES = ("jaxserve", "sharding", "pallas_kernels")
SOURCES = ("*.py", "*.cc", "*.h")  # the step's Python, and the CPU kernels it calls (jax.ffi)
KEEP = 8
SECTIONS = ("model", "tokenizer", "checkpoint", "cache", "scheduler", "runner", "mesh",
            "speculative")
INDEX = "by-program"  # a hard link to each saved file, named by the program it holds


def tree_digest(top: Path) -> str:
    """sha256 over the SOURCES files of the PACKAGES folders under `top`."""
    h = hashlib.sha256()
    for name in PACKAGES:
        root = top / name
        for path in sorted(p for pattern in SOURCES for p in root.rglob(pattern)):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


@functools.cache
def source_digest() -> str:
    """tree_digest of the packages that build the step (installed side by side, checked out
    or not)."""
    return tree_digest(Path(__file__).resolve().parents[2])


# JAX's own cache hits, counted: a program JAX loaded from its cache does not serialize
# whole on XLA:CPU (the copy fails at run time in the next process: "Function wrapped_iota
# not found"), so such a program is not saved here.
_jax_cache_hits = [0]


def _count_hit(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _jax_cache_hits[0] += 1


jax.monitoring.register_event_listener(_count_hit)


def _describe(x) -> str:
    return f"{x.shape}:{x.dtype}:{getattr(x, 'sharding', None)}"


class ProgramCache:
    """The programs of one runner: `devices` are its mesh's, in the mesh's order."""

    def __init__(self, directory: str | os.PathLike, config, model_config, devices):
        self.devices = tuple(devices)
        # what a compiled program depends on besides its config and lowered text
        self.build = "\n".join([
            source_digest(), jax.__version__, jaxlib.__version__, jax.default_backend(),
            self.devices[0].client.platform_version, self.devices[0].device_kind,
            repr([d.id for d in self.devices]), os.environ.get("XLA_FLAGS", "")])
        base = "\n".join([*(f"{s}={getattr(config, s)!r}" for s in SECTIONS),
                          repr(model_config), self.build])
        self.root = Path(directory).expanduser()
        self.directory = self.root / hashlib.sha256(base.encode()).hexdigest()[:32]
        self.index = self.root / INDEX
        self._warned = False

    def path(self, bucket: tuple, args) -> Path:
        leaves, tree = jax.tree.flatten(args)
        text = "\n".join([repr(bucket), str(tree), *map(_describe, leaves)])
        return self.directory / (hashlib.sha256(text.encode()).hexdigest() + ".bin")

    def load(self, path: Path):
        """The compiled program saved at `path` (from `path()`), or None."""
        if not path.is_file():
            return None
        try:
            payload, in_tree, out_tree = pickle.loads(zlib.decompress(path.read_bytes()))
            compiled = serialize_executable.deserialize_and_load(
                payload, in_tree, out_tree, backend=self.devices[0].client,
                execution_devices=self.devices)
        except Exception as e:  # noqa: BLE001 - any failure means: compile it again
            if not self._warned:
                log.warning("compiled program %s did not load (%s: %s); compiling it again",
                            path.name, type(e).__name__, e)
                self._warned = True
            self._forget(path)  # replaced when this compile is saved
            return None
        os.utime(self.directory)  # used now: kept by the pruning below
        return compiled

    def program_file(self, path: Path, lowered, compiler_options: dict | None) -> Path:
        """Where `by-program/` links the saved file of this lowered program, its arguments'
        structure (`path`'s name) and XLA options: the same for every config that compiles
        the same program."""
        h = hashlib.sha256("\n".join([self.build, path.name, repr(sorted(
            (compiler_options or {}).items())), lowered.as_text()]).encode())
        return self.index / (h.hexdigest() + ".bin")

    def compile_and_save(self, path: Path, lowered, compiler_options: dict | None = None):
        """Compile a step (with XLA's `compiler_options`) and save it. A program JAX found in
        its own cache does not serialize whole, and compiling it again would cost a cold
        compile: the file another config saved for it is linked to `path` instead, where
        there is one."""
        hits = _jax_cache_hits[0]
        compiled = lowered.compile(compiler_options)
        program = self.program_file(path, lowered, compiler_options)
        if _jax_cache_hits[0] == hits:
            if self.save(path, compiled):
                self._link(path, program)
        elif program.is_file():
            self._link(program, path)
        return compiled

    def save(self, path: Path, compiled) -> bool:
        """Write `compiled` to `path`; False where it does not serialize."""
        try:
            data = zlib.compress(pickle.dumps(serialize_executable.serialize(compiled)), 1)
        except (ValueError, NotImplementedError, pickle.PicklingError) as e:
            log.warning("compiled program %s cannot be saved: %s", path.name, e)
            return False
        self._make_directory()
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # a reader never sees half a file
        return True

    def _make_directory(self) -> None:
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True, exist_ok=True)
            self._prune()

    def _link(self, source: Path, target: Path) -> None:
        """Hard-link `source` as `target` (replacing it whole); where the file system has no
        hard links, nothing: the program is compiled at each start, as before."""
        if target.parent == self.directory:
            self._make_directory()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        try:
            tmp.unlink(missing_ok=True)
            os.link(source, tmp)
            os.replace(tmp, target)
        except OSError as e:
            log.debug("no link %s -> %s: %s", source, target, e)
            tmp.unlink(missing_ok=True)

    def _forget(self, path: Path) -> None:
        """Remove a saved file and its links in `by-program/` (the same bytes)."""
        try:
            inode = path.stat().st_ino
        except OSError:
            return
        if self.index.is_dir():
            for link in self.index.iterdir():
                try:
                    if link.stat().st_ino == inode:
                        link.unlink()
                except OSError:
                    pass
        path.unlink(missing_ok=True)

    def _prune(self) -> None:
        """Keep this folder and the KEEP - 1 others used last, and the links of `by-program/`
        that a kept folder shares."""
        others = sorted((p for p in self.root.iterdir()
                         if p.is_dir() and p not in (self.directory, self.index)),
                        key=lambda p: p.stat().st_mtime, reverse=True)
        for old in others[KEEP - 1:]:
            shutil.rmtree(old, ignore_errors=True)
        if self.index.is_dir():
            for link in self.index.glob("*.bin"):
                if link.stat().st_nlink == 1:  # its folders are gone
                    link.unlink(missing_ok=True)
