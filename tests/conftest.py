"""Test-wide setup. Eight host CPU devices, so sharding tests can build real meshes;
this must happen before jax is imported anywhere."""

import os

_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES_FLAG}".strip()

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "configs" / "smollm2-135m-cpu.yaml"


@pytest.fixture(scope="session")
def demo_config():
    """The demo config with test-sized buckets and stacked layers (the layout every mesh
    takes, pipeline stages too; the demo's own layer loop has tests of its own); the model
    is fetched/converted once into JAXSERVE_CACHE_DIR (default ~/.cache/jaxserve) and reused
    across runs."""
    from jaxserve.config import load_config

    cache = os.environ.get("JAXSERVE_CACHE_DIR", "~/.cache/jaxserve")
    return load_config(DEMO_CONFIG).replace(
        checkpoint__cache_dir=cache,
        runner__compilation_cache_dir=os.path.join(cache, "xla-tests"),
        runner__token_buckets=(16, 64),
        runner__seq_buckets=(4, 16),
        scheduler__max_num_batched_tokens=64,
        runner__layer_arrays=False,
        runner__layer_loop=False,
        runner__transposed_weights=False,
    )


@pytest.fixture(scope="session")
def demo_gguf(demo_config):
    """Path of the demo GGUF (JAXSERVE_DEMO_GGUF, or downloaded once into the cache)."""
    from jaxserve.checkpoint.demo import demo_gguf as fetch

    return fetch(demo_config.checkpoint.cache_dir)


@pytest.fixture(scope="session")
def demo_model(demo_config):
    from jaxserve.loader import load_model

    return load_model(demo_config, progress=False)


@pytest.fixture(scope="session")
def demo_llm(demo_config):
    from jaxserve.engine.llm import LLM

    return LLM(demo_config, progress=False)


@pytest.fixture(scope="session")
def mixed_sampling():
    """Six requests' sampling parameters that cover every sampling feature (greedy,
    temperature with top-p/top-k/min-p, penalties, logprobs, stop strings and ids)."""
    from jaxserve.engine.request import SamplingParams

    return [SamplingParams(max_tokens=5, temperature=0.0),
            SamplingParams(max_tokens=7, temperature=0.8, top_p=0.9, seed=3, logprobs=2),
            SamplingParams(max_tokens=4, temperature=1.0, top_k=5, repetition_penalty=1.3),
            SamplingParams(max_tokens=6, presence_penalty=0.5, frequency_penalty=0.5,
                           min_p=0.1, stop=("the",)),
            SamplingParams(max_tokens=3, min_tokens=2, stop_token_ids=(13,)),
            SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)]


@pytest.fixture(scope="session")
def unused_port():
    """unused_port() -> a free loopback port below the kernel's ephemeral range."""
    return _unused_port


def _unused_port() -> int:
    """A free loopback port below the kernel's ephemeral range (Linux: 32768 and up). A port
    asked of the kernel with bind(0) and then released can be handed straight to the next
    bind(0), such as a test server's own gRPC port, before the test binds it."""
    import random
    import socket

    start = random.randrange(20000, 30000)
    for port in range(start, 32768):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {start}-32767")
