"""`jaxserve` command line: convert | generate | serve | client | bench.

Expected failures (bad config, bad checkpoint, bad input) print one line and exit 2;
they never print a traceback.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
from pathlib import Path

from jaxserve.config import QUANTIZATIONS
from jaxserve.errors import DeploymentError, JaxserveError
from jaxserve.jsonl import read_jsonl

EXIT_USAGE = 2


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    from jaxserve.engine.request import DEFAULT_MAX_TOKENS

    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling_params(args):
    from jaxserve.engine.request import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          seed=args.seed, stop=tuple(args.stop))


def _read_prompts(path: str) -> list[tuple[int, dict]]:
    """(line, record) of each prompt; a record is one "prompt" (text or token ids) or one
    "messages" list, and nothing else (sampling comes from the command line)."""
    rows = []
    for n, row in read_jsonl(path):
        keys = set(row) & {"prompt", "messages"}
        if len(keys) != 1 or set(row) - keys:
            raise JaxserveError(f'{path}:{n}: expected {{"prompt": ...}} or {{"messages": '
                                f'[...]}} and no other key (got {sorted(row)}); sampling '
                                "options are the command line's")
        value = row.get("prompt", row.get("messages"))
        if "prompt" in row and not isinstance(value, str | list):
            raise JaxserveError(f"{path}:{n}: prompt: expected text or a list of token ids "
                                f"(got {type(value).__name__})")
        if "messages" in row and not isinstance(value, list):
            raise JaxserveError(f"{path}:{n}: messages: expected a list (got "
                                f"{type(value).__name__})")
        rows.append((n, row))
    return rows


def cmd_generate(args) -> int:
    from jaxserve import launch
    from jaxserve.config import load_config
    from jaxserve.engine.llm import LLM, PromptError

    # Everything that can be checked without the model is checked before it loads.
    prompts: list = list(args.prompt)
    if any(not p for p in prompts):
        raise JaxserveError("--prompt: the prompt is empty")
    where = [f"--prompt #{i + 1}" for i in range(len(prompts))]  # for errors
    if args.input:
        rows = _read_prompts(args.input)
        if not rows:
            raise JaxserveError(f"{args.input}: no prompts in it (expected JSONL lines of "
                                '{"prompt": ...} or {"messages": [...]})')
        prompts += [row for _, row in rows]
        where += [f"{args.input}:{n}" for n, _ in rows]
    if not prompts:
        raise JaxserveError("generate: give at least one --prompt or an --input file")
    config = launch.with_distributed_args(load_config(args.config), args, args.config)
    params = _sampling_params(args)
    params.validate(vocab_size=2**31 - 1, max_logprobs=config.runner.max_logprobs)
    if not launch.join(config):  # a follower: the leader's steps until it is done
        return launch.follow(config, progress=not args.json)
    llm = LLM(config, progress=not args.json)
    try:
        outs = llm.generate(prompts, params, chat=args.chat)
    except PromptError as e:  # name the prompt: its --prompt or its file and line
        raise JaxserveError(f"{where[e.index]}: {e.error}") from None
    llm.engine.close()
    for out in outs:
        if args.json:
            print(json.dumps({
                "prompt_token_ids": out.prompt_token_ids, "token_ids": out.token_ids,
                "text": out.text, "finish_reason": out.finish_reason.value,
                **({"error": out.error} if out.error else {}),
                "usage": {"prompt_tokens": len(out.prompt_token_ids),
                          "completion_tokens": len(out.token_ids),
                          **_speculative_usage(out.metrics)},
            }, ensure_ascii=False))
        else:
            print(out.text)
            print(f"--- [{out.finish_reason.value}, {len(out.token_ids)} tokens]"
                  + (f" {out.error}" if out.error else ""))
    failed = sum(out.error is not None for out in outs)
    if failed:
        print(f"generate: {failed} of {len(outs)} prompts failed", file=sys.stderr)
    return 1 if failed else 0


def _speculative_usage(metrics) -> dict:
    """Speculative decoding's figures for a request's usage (when it proposed anything)."""
    if metrics is None or not metrics.draft_tokens:
        return {}
    return {"draft_tokens": metrics.draft_tokens, "accepted_tokens": metrics.accepted_tokens,
            "acceptance_rate": round(metrics.accepted_tokens / metrics.draft_tokens, 4),
            "mean_accepted_length": round(
                (metrics.accepted_tokens + metrics.verify_steps) / metrics.verify_steps, 4)}


def cmd_convert(args) -> int:
    from jaxserve.checkpoint.convert import convert
    from jaxserve.checkpoint.file_lock import exclusive, lock_path

    # The lock a server's loader takes to convert into the same folder: two conversions
    # into one folder share its .tmp, and each would remove the other's files.
    out = Path(args.out).resolve()
    with exclusive(lock_path(out), f"waiting for another process converting into {out}"):
        cfg = convert(args.source, out, dtype=args.dtype, overwrite=args.overwrite,
                      quantization=args.quantize)
    quantized = "" if cfg.quantization == "none" else f", linear layers in {cfg.quantization}"
    print(f"wrote {args.out}: {cfg.architecture}, {cfg.num_layers} layers, "
          f"{cfg.num_params / 1e6:.0f}M parameters{quantized}")
    return 0


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help that names each flag's default, where it has a meaningful one."""

    @staticmethod
    def _shown(default) -> bool:
        return not (default is None or default is False or default == []
                    or default is argparse.SUPPRESS)

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._shown(action.default):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not self._shown(action.default) or "%(default)" in text:
            return text
        return f"{text} (default: %(default)s)".strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxserve", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    # Every command's --help shows each flag's default.
    add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: add_parser(*a, formatter_class=_DefaultsFormatter, **k)

    p = sub.add_parser("convert", help="GGUF file or HF safetensors dir -> Orbax checkpoint")
    p.add_argument("source", help="a .gguf file or a Hugging Face model directory")
    p.add_argument("out", help="output directory")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--quantize", choices=list(QUANTIZATIONS), default="none",
                   help="store the linear layers' weights quantized: int8 or fp8 with "
                        "per-channel scales, q8_0 with a scale per 32 inputs (a Q8_0 GGUF's "
                        "own bytes)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="offline generation")
    p.add_argument("--config", required=True)
    p.add_argument("--prompt", action="append", default=[],
                   help="a prompt to complete; repeat it for several")
    p.add_argument("--input", help='JSONL file of {"prompt": ...} or {"messages": [...]}')
    p.add_argument("--chat", action="store_true", help="render the chat template")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    _add_sampling_args(p)
    from jaxserve import launch

    launch.add_distributed_args(p)
    p.set_defaults(func=cmd_generate)

    from jaxserve import cli_server  # serve, client, bench

    cli_server.add_commands(sub, _add_sampling_args, _sampling_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except JaxserveError as e:
        print(f"jaxserve {args.command}: error: {e}", file=sys.stderr)
        launch = sys.modules.get("jaxserve.launch")
        if isinstance(e, DeploymentError) or (launch is not None and launch.joined):
            # No shutdown barrier with the other processes: JAX's would wait for processes
            # that wait for this one (they notice it is gone and leave too).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_USAGE)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
