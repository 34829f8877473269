"""Loading a model: what happens before the engine exists."""

import subprocess
import sys

from engine_checks import save_tiny_shape

SCRIPT = """
import sys
from jaxserve.config import Config
from jaxserve.loader import load_model
config = Config().replace(model__name="tiny", model__dtype="float32",
                          checkpoint__source="random", checkpoint__random_shape=sys.argv[1],
                          cache__max_model_len=64, cache__kv_cache_memory=float(1 << 20),
                          runner__compilation_cache_dir=sys.argv[2])
load_model(config, progress=False)
"""


def test_load_model_compiles_into_the_persistent_cache(tmp_path):
    """Making random weights compiles programs: with the cache on before them, a warm start
    loads those too (on an H200 the 8B shape's load fell from 5.1 to 2.4 s warm). Its own
    process, since JAX opens the cache once per process."""
    shape = save_tiny_shape(tmp_path / "tiny.json")
    cache = tmp_path / "xla"
    subprocess.run([sys.executable, "-c", SCRIPT, str(shape), str(cache)], check=True,
                   timeout=300)
    assert cache.is_dir() and any(p.is_file() for p in cache.rglob("*"))


def test_directories_that_cannot_be_created_name_their_setting(tmp_path):
    import pytest

    from jaxserve.config import Config
    from jaxserve.engine.runner import setup_compilation_cache
    from jaxserve.errors import ConfigError
    from jaxserve.loader import checkpoint_dir

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(ConfigError) as e:
        setup_compilation_cache(str(a_file / "xla"))
    assert str(e.value) == (f"runner.compilation_cache_dir: cannot create {a_file / 'xla'}: "
                            "Not a directory")
    config = Config().replace(checkpoint__source="demo", checkpoint__cache_dir=str(a_file / "c"))
    with pytest.raises(ConfigError) as e:
        checkpoint_dir(config, progress=False)
    assert str(e.value) == f"checkpoint.cache_dir: cannot create {a_file / 'c'}: Not a directory"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    config = Config().replace(checkpoint__source=str(gguf), checkpoint__path=str(a_file / "o"))
    with pytest.raises(ConfigError, match=r"^checkpoint.path: cannot create .*a-file: File "):
        checkpoint_dir(config, progress=False)
