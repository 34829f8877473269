"""Quality of quantized weights and KV caches: teacher-forced top-1 agreement and perplexity
against full precision, on a committed public-domain text.

    python scripts/quant_quality.py --config configs/smollm2-135m-cpu.yaml \
        --modes int8 fp8 --kv-modes int8 fp8 --out bench/results/quant-quality.json

The text (bench/texts/public-domain-sample.txt: the Declaration of Independence, the
Gettysburg Address and Lincoln's Second Inaugural Address) runs through the model as one
sequence (jaxserve/quality.py). Reference: the config's model with `model.quantization: none`
in the config's dtype (float32 on CPU, bfloat16 on GPU), its KV cache in that dtype too.
For each weight mode (`model.quantization`, KV cache as the reference's) and each KV mode
(`cache.kv_dtype`, weights as the reference's; with --kv-rotation each also with
`cache.kv_rotation`): the share of positions whose top-1 next token matches the
reference's, and both perplexities. --fp8-activations adds fp8 weights with
`runner.fp8_activations` (outputs-first): in chunks of 512 tokens every matmul then
multiplies fp8 activations, as a prefill program of 128+ tokens does. --int8-activations
adds int8 weights with `runner.int8_activations` likewise (int8 activations, as every
program of 2+ tokens has them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import jax

from jaxserve.config import load_config
from jaxserve.loader import load_model
from jaxserve.quality import compare, score
from sharding.mesh import MeshConfig

TEXT = Path(__file__).resolve().parent.parent / "bench" / "texts" / "public-domain-sample.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/smollm2-135m-cpu.yaml")
    ap.add_argument("--modes", nargs="*", default=["int8", "fp8"], choices=["int8", "fp8", "q8_0"],
                    help="weight quantizations")
    ap.add_argument("--kv-modes", nargs="*", default=["int8", "fp8"], choices=["int8", "fp8"],
                    help="KV cache dtypes")
    ap.add_argument("--kv-rotation", action="store_true",
                    help="also run each KV dtype with cache.kv_rotation (Hadamard-rotated vectors)")
    ap.add_argument("--fp8-activations", action="store_true",
                    help="also fp8 weights times fp8 activations (runner.fp8_activations)")
    ap.add_argument("--int8-activations", action="store_true",
                    help="also int8 weights times int8 activations (runner.int8_activations)")
    ap.add_argument("--text", default=str(TEXT))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    config = load_config(args.config).replace(mesh=MeshConfig())  # one device: quality.py
    dtype = config.model.dtype
    t = time.perf_counter()
    loaded = load_model(config.replace(model__quantization="none"), progress=False)
    if loaded.tokenizer is None:
        raise SystemExit("the config's checkpoint has no tokenizer (random weights?): "
                         "quality needs real weights")
    ids = loaded.tokenizer.encode(Path(args.text).read_text())
    layout = dict(transposed=config.runner.transposed_weights,
                  q8_0_tiles=config.runner.q8_0_tiles)
    reference = score(loaded, ids, dtype, **layout)
    print(f"reference ({dtype}): {len(ids)} tokens, perplexity "
          f"{compare(reference, reference)['perplexity']:.3f} ({time.perf_counter() - t:.0f} s)",
          flush=True)
    rows = []
    runs = ([("weights", mode, {}) for mode in args.modes]
            + [("kv_cache", m, {}) for m in args.kv_modes]
            + [("kv_cache", m, {"kv_rotation": True}) for m in args.kv_modes
               if args.kv_rotation]
            + [("weights", "fp8", {"fp8_activations": True})] * args.fp8_activations
            + [("weights", "int8", {"int8_activations": True})] * args.int8_activations)
    for what, mode, extra in runs:
        t = time.perf_counter()
        if what == "weights" and extra:  # {"<mode>_activations": True}
            on = config.replace(model__quantization=mode, runner__layer_arrays=True,
                                runner__transposed_weights=True,
                                **{f"runner__{key}": True for key in extra})
            result = compare(reference, score(load_model(on, progress=False), ids, dtype,
                                              transposed=True, quantized_activations=True))
        elif what == "weights":
            model = load_model(config.replace(model__quantization=mode), progress=False)
            result = compare(reference, score(model, ids, dtype, **layout))
        else:
            result = compare(reference, score(loaded, ids, dtype, kv_dtype=mode,
                                              kv_rotation=bool(extra), **layout))
        row = {"quantized": what, "mode": mode, **extra, **result,
               "seconds": time.perf_counter() - t}
        rows.append(row)
        mode = " ".join([mode, *(k.replace("_", " ") for k in extra)])
        print(f"{what} {mode}: top-1 agreement {row['top1_agreement']:.2%}, perplexity "
              f"{row['perplexity']:.3f} (reference {row['perplexity_reference']:.3f})",
              flush=True)
    result = {"benchmark": "quantization-quality",
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "device": jax.devices()[0].device_kind, "machine": platform.machine(),
              "jax": jax.__version__, "config": args.config, "dtype": dtype,
              "text": Path(args.text).name, "tokens": len(ids), "runs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
