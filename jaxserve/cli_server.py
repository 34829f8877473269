"""CLI commands of the serving side: serve, client, bench (filled in by the server)."""

from __future__ import annotations


def add_commands(sub, add_sampling_args, sampling_params) -> None:
    """Register serve/client/bench subcommands (none yet)."""
