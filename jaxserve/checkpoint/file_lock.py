"""One process at a time: an exclusive lock on a file beside what a process is about to write.

Several processes may start together on a fresh machine, and all of them find the model not
yet converted: the processes of `scripts/launch/local.sh`, or two servers sharing a cache
directory. Without a lock each one converts into the same directory and removes the
other's half-written files, and both fail. With it, one converts while the others wait,
then find the checkpoint complete and load it. The lock is the kernel's (flock), so a
process that dies releases it; the lock file itself stays, empty.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from pathlib import Path

from jaxserve.errors import CheckpointError


@contextlib.contextmanager
def exclusive(path: Path, waiting: str):
    """Hold an exclusive lock on `path` (created if missing) for the block. If another
    process holds it, print `waiting` to stderr and block until it lets go."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # the folder cannot be made or written (a file in the way, say)
        raise CheckpointError(f"cannot create {path}, the lock beside the output: "
                              f"{e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def lock_path(target: Path) -> Path:
    """The lock file that guards `target`: `<target>.lock` beside it."""
    return target.with_name(target.name + ".lock")
