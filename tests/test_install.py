"""`pip install .` installs the library and the `fidelityquant` console script, usable from any folder.

Offline and fast: pip builds from a copy of the files the wheel needs (so no build/ or *.egg-info lands in the
checkout), with this environment's setuptools (--no-build-isolation), without dependencies (--no-deps,
--no-index: they are already here), into a --target folder instead of a fresh venv.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180


def test_pip_install_gives_the_library_and_the_console_script(tmp_path):
    pytest.importorskip("setuptools", reason="setuptools is needed to build the wheel offline")
    src, target = tmp_path / "src", tmp_path / "target"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "quant_core", src / "quant_core", ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(target), str(src)],
                         capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stdout + out.stderr
    # Only the library is packaged; the ComfyUI / A1111 glue stays in the repository folder the hosts load.
    assert (target / "quant_core" / "__main__.py").is_file()
    for host_glue in ("nodes", "fidelityquant_webui", "scripts", "bench", "tests", "__init__.py"):
        assert not (target / host_glue).exists(), host_glue
    script = target / "bin" / "fidelityquant"
    assert script.is_file()
    elsewhere = tmp_path / "elsewhere"  # not the repository root: python -m quant_core would not work here
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target))
    run = dict(cwd=elsewhere, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    where = subprocess.run([sys.executable, "-c", "import quant_core; print(quant_core.__file__)"], **run)
    assert Path(where.stdout.strip()).is_relative_to(target), where.stdout + where.stderr
    helped = subprocess.run([str(script), "quantize", "--help"], **run)  # its own shebang: this Python
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: fidelityquant quantize") and "--bits-budget" in helped.stdout
    assert "--config" in helped.stdout
