"""The garbage collector's pauses while an engine serves, with start-up's objects frozen
(engine/heap.py, as the server and the offline LLM run) and without.

    python scripts/bench_gc.py --tiny --rounds 20 --num-requests 128 --input-len 512 \\
        --output-len 64 --out gc.json

Each setting runs in a fresh process: load, warm-up, one untimed round, then (frozen or
not) --rounds rounds of --num-requests requests of --input-len random prompt tokens that
generate --output-len tokens each. --config names the engine's config (default: the demo's
for the backend); with --tiny its model is bench_host.py's tiny random one and its scheduler
takes all the requests at once (prefill chunks of 2048 tokens): what the collector sees is
the engine's Python, which does not depend on the model's size, and a round takes seconds
on a CPU where the demo's would take minutes. `gc.callbacks` times every collection
(scripts/timing.py, GcPauses): per generation, how many ran, their summed and longest
pause, with the rounds' wall time and the number of objects the collector tracked after
warm-up. The oldest generation's collections are the ones that walk start-up's objects.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_host import TINY, default_base, tiny_config


def one_setting(args) -> dict:
    from timing import GcPauses

    from jaxserve.config import load_config
    from jaxserve.engine.engine import Engine
    from jaxserve.engine.heap import freeze_startup
    from jaxserve.engine.request import SamplingParams
    from jaxserve.loader import load_model

    if args.tiny:
        shape = Path(tempfile.mkdtemp()) / "tiny.json"
        TINY.save(shape)
        config = tiny_config(args.config, shape, args.num_requests,
                             args.input_len + args.output_len)
    else:
        config = load_config(args.config)
    loaded = load_model(config, progress=False)
    if args.tiny:
        shutil.rmtree(shape.parent)
    engine = Engine(config, loaded.model_config, loaded.params, loaded.tokenizer, loaded.mesh)
    engine.warm_up(progress=False)
    rng = np.random.default_rng(args.seed)
    vocab = loaded.model_config.vocab_size
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)

    def run(tag: str) -> None:
        for i in range(args.num_requests):
            engine.add_request(rng.integers(3, vocab, args.input_len).tolist(), params,
                               f"{tag}-{i}")
        while engine.has_unfinished():
            engine.step()

    run("warm")
    tracked = len(gc.get_objects())
    frozen = freeze_startup() if args.one == "on" else 0
    start = time.perf_counter()
    with GcPauses() as pauses:
        for r in range(args.rounds):
            run(f"r{r}")
    return {"freeze": args.one, "tracked_after_warm_up": tracked, "frozen": frozen,
            "rounds_s": time.perf_counter() - start, "gc": pauses.summary()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=None,
                    help="engine config (default: the demo's for this backend)")
    ap.add_argument("--tiny", action="store_true",
                    help="bench_host.py's tiny random model, every request at once")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--num-requests", type=int, default=128)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--freeze", nargs="+", choices=("on", "off"), default=["off", "on"])
    ap.add_argument("--one", choices=("on", "off"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="JSON path (omitted with --one)")
    args = ap.parse_args(argv)
    args.config = str(args.config or default_base())
    if args.one is not None:  # a child: one setting, its row on stdout
        print(json.dumps(one_setting(args)))
        return
    rows = []
    for setting in args.freeze:
        child = [sys.executable, __file__, "--one", setting, "--config", args.config,
                 "--rounds", str(args.rounds), "--num-requests", str(args.num_requests),
                 "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                 "--seed", str(args.seed), *(["--tiny"] if args.tiny else [])]
        out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    result = {"benchmark": "gc-pauses",
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": platform.machine(), "config": Path(args.config).name,
              "tiny": args.tiny, "rounds": args.rounds,
              "num_requests": args.num_requests, "input_len": args.input_len,
              "output_len": args.output_len, "rows": rows}
    out = Path(args.out or f"bench/results/gc-pauses-{datetime.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
