"""The Python heap of a serving process: what start-up built, kept out of the cyclic GC.

Loading a model and compiling its step programs leaves some 300,000 objects that CPython's
garbage collector tracks (parameter trees, traced programs, JAX's caches), nearly all of
them alive until the process ends. The collector's oldest generation is collected whenever
enough objects have survived into it, and such a collection walks every tracked object:
80-130 ms on a 2-core CPU after warm-up, time in which the engine's thread does
not step and the device waits for it (docs/performance.md, "Start-up's objects out of the
garbage collector's way").

`freeze_startup()`, called once the engine is warm, collects what start-up left as garbage
and moves everything still alive into the collector's permanent generation (`gc.freeze`):
later collections walk only what serving allocated since. Frozen objects that die later
are still freed by their reference counts; only reference cycles among them wait for
`thaw()` (the engine loop calls it when it stops) or for the next `freeze_startup()`, which
thaws first. So a process that starts several engines one after the other (the tests)
frees each one's cycles too.

`PauseWatch` times each collection while it is on (`gc.callbacks`): the server's metrics
and the benchmarks' records both take their pauses from it.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable


def freeze_startup() -> int:
    """Collect, then freeze every object still alive; returns how many were frozen."""
    gc.unfreeze()  # objects an earlier freeze kept: collected now if they are garbage
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def thaw() -> None:
    """Give the frozen objects back to the collector."""
    gc.unfreeze()


class PauseWatch:
    """While started (or inside `with`), on_pause(generation, seconds) after each collection
    of the cyclic garbage collector, timed from its start to its stop."""

    def __init__(self, on_pause: Callable[[int, float], None]):
        self._on_pause = on_pause
        self._start = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self._on_pause(info["generation"], time.perf_counter() - self._start)

    def start(self) -> None:
        gc.callbacks.append(self._callback)

    def stop(self) -> None:
        gc.callbacks.remove(self._callback)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
