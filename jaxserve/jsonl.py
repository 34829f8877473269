"""Reading JSONL input files (prompts for generate, datasets for the load generator)."""

from __future__ import annotations

import json
from pathlib import Path

from jaxserve.errors import JaxserveError


def read_jsonl(path: str | Path, what: str = "input file") -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; JaxserveError names file and line."""
    p = Path(path)
    if not p.is_file():
        raise JaxserveError(f"{p}: {what} not found")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[:e.start].count(b"\n") + 1
        raise JaxserveError(f"{p}:{line}: not UTF-8 text (byte {e.start}: "
                            f"{p.read_bytes()[e.start:e.start + 1]!r})") from None
    rows = []
    # Lines end at "\n" only: JSON strings may hold U+2028 and the like unescaped, which
    # str.splitlines() would also break at.
    for n, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise JaxserveError(f"{p}:{n}: invalid JSON: {e.msg}") from None
        except (ValueError, RecursionError) as e:  # an integer of over 4300 digits; nesting
            # deeper than Python's recursion limit
            raise JaxserveError(f"{p}:{n}: JSON this reader cannot take: {e}") from None
        if not isinstance(row, dict):
            raise JaxserveError(f"{p}:{n}: expected a JSON object")
        rows.append((n, row))
    return rows
