"""Start-up shared by `serve` and `generate`: the distributed flags, joining the other
processes, and a follower's life (run the leader's steps until it says stop)."""

from __future__ import annotations

import argparse
import dataclasses

from jaxserve.config import Config
from jaxserve.errors import ConfigError


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several processes (default: the config's distributed: "
                             "section, else the cluster's own variables, else one process)")
    g.add_argument("--coordinator-address", help="HOST:PORT of process 0")
    g.add_argument("--num-processes", type=int, help="processes in the deployment")
    g.add_argument("--process-id", type=int, help="this process's index; 0 leads")


def with_distributed_args(config: Config, args, source: str) -> Config:
    """The config with the command line's distributed flags applied."""
    flags = {"coordinator_address": args.coordinator_address,
             "num_processes": args.num_processes, "process_id": args.process_id}
    flags = {k: v for k, v in flags.items() if v is not None}
    if not flags:
        return config
    try:
        return config.replace(distributed=dataclasses.replace(config.distributed, **flags))
    except ValueError as e:  # name the flags: the file alone may be fine
        given = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in flags.items())
        raise ConfigError(f"{source} with {given}: distributed.{e}") from None


joined = False  # this process runs with others (jax.distributed): main() then leaves at once


def join(config: Config) -> bool:
    """Join the deployment's other processes, if any (before anything touches a device);
    returns whether this process leads. Errors are ConfigErrors, one line each."""
    global joined
    import jax

    from jaxserve.engine.multihost import check_same_config, check_same_devices
    from sharding.distributed import initialize

    try:
        joined = initialize(config.distributed)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(str(e)) from None
    check_same_devices(config.distributed.init_timeout_s)
    check_same_config(config)
    return jax.process_index() == 0


def follow(config: Config, progress: bool) -> int:
    """A follower: load this process's shards of the model, then run the leader's steps."""
    from jaxserve.engine.engine import Engine
    from jaxserve.loader import load_model

    loaded = load_model(config, progress=progress)
    engine = Engine(config, loaded.model_config, loaded.params, loaded.tokenizer, loaded.mesh)
    engine.runner.follow()
    return 0
