"""Ready to publish to the Comfy Registry: pyproject.toml, LICENSE, `comfy node validate`, the archive.

comfy-cli (pinned in requirements-dev.txt) runs in subprocesses with HOME in a temporary folder,
telemetry off (DO_NOT_TRACK, COMFY_NO_TELEMETRY), --skip-prompt, stdin closed and a timeout, so its
first-run tracking question can never wait for input and nothing is written to the user's home or
to the repository (ruff, which `validate` runs, gets its cache folder in tmp too). Neither
`comfy node validate` nor the packing needs the network: validate parses pyproject.toml and runs
`python -m ruff check . --select S102,S307,E702 --exit-zero`; packing zips `git ls-files` minus
.comfyignore (plus [tool.comfy] includes), all local.

The archive is built by comfy-cli's own `zip_files` with the includes read by its own
`extract_node_configuration`: exactly what `comfy node pack` and `comfy node publish` call, only
with the zip written to tmp instead of ./node.zip.
"""
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 60
PROXY_WEIGHTS = "bench/proxy/weights/"
# Bounds for the archive: the proxy weights are 8.5 MB, everything else is source, docs and
# workflows (about 0.7 MB today). Any single other file over 512 KiB means something large slipped in.
MAX_TOTAL_BYTES = 12 * 2**20
MAX_OTHER_FILE_BYTES = 512 * 2**10
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".onnx", ".gguf", ".npz")
# sha256 of the canonical license texts (apache.org LICENSE-2.0.txt) by pyproject's SPDX id.
LICENSE_SHA256 = {"Apache-2.0": "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"}

pytest.importorskip("comfy_cli", reason="comfy-cli is not installed (pip install -r requirements-dev.txt)")


def _env(tmp_path: Path) -> dict:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = dict(os.environ, HOME=str(home), DO_NOT_TRACK="1", COMFY_NO_TELEMETRY="1",
               RUFF_CACHE_DIR=str(tmp_path / "ruff-cache"), PYTHONDONTWRITEBYTECODE="1", NO_COLOR="1")
    env.pop("COMFY_OUTPUT", None)
    return env


def _run(args: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


PACK = """
import sys
from comfy_cli.file_utils import zip_files
from comfy_cli.registry.config_parser import extract_node_configuration
config = extract_node_configuration()  # ./pyproject.toml, as `comfy node pack` reads it
assert config is not None, "pyproject.toml did not parse"
zip_files(sys.argv[1], includes=config.tool_comfy.includes)
"""


def _pack(cwd: Path, zip_path: Path, env: dict) -> zipfile.ZipFile:
    out = _run([sys.executable, "-c", PACK, str(zip_path)], cwd, env)
    assert out.returncode == 0, out.stdout + out.stderr
    return zipfile.ZipFile(zip_path)


def _git_files() -> list:
    out = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True, timeout=TIMEOUT_S)
    if out.returncode != 0:
        pytest.skip(f"not a git checkout ({out.stderr.strip()}); the archive is built from git-tracked files")
    return [f for f in out.stdout.splitlines() if (REPO / f).is_file()]


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def test_pyproject_is_complete_for_the_registry(pyproject):
    from comfy_cli.registry.config_parser import validate_version

    project, comfy = pyproject["project"], pyproject["tool"]["comfy"]
    # Registry node id rules (docs.comfy.org/registry/specifications): < 100 characters, letters,
    # digits, "-", "_", "."; no two special characters in a row; starts with a letter; no "ComfyUI".
    name = project["name"]
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*", name), name
    assert "comfyui" not in name.lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), "registry versions are X.Y.Z"
    assert project["urls"]["Repository"].startswith("https://github.com/")
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert "Icon" in comfy and isinstance(comfy["includes"], list)

    # The description says what exists: no A1111/Forge extension until scripts/ holds one.
    has_a1111_extension = any((REPO / "scripts").glob("*.py"))
    if not has_a1111_extension:
        assert not re.search(r"A1111|AUTOMATIC1111|Forge|webui", project["description"], re.I), project["description"]
    else:
        assert re.search(r"AUTOMATIC1111|A1111", project["description"]), "the description omits the A1111 extension"

    # Dependencies: the same as requirements.txt (what ComfyUI-Manager and install.py install), never torch.
    reqs = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert sorted(project["dependencies"]) == sorted(reqs)
    assert not any(re.match(r"torch\b", dep) for dep in project["dependencies"])

    # requires-comfyui: a form comfy-cli accepts (else it silently drops it), lower bound = a tested version.
    rng = comfy["requires-comfyui"]
    assert validate_version(rng, "requires-comfyui") == rng
    lower = re.search(r">=\s*(\d+\.\d+\.\d+)", rng).group(1)
    assert lower in (REPO / "README.md").read_text(), f"ComfyUI {lower} is not named as tested in README"


def test_license_file_matches_pyproject(pyproject):
    spdx = pyproject["project"]["license"]["text"]
    text = (REPO / "LICENSE").read_bytes()
    assert hashlib.sha256(text).hexdigest() == LICENSE_SHA256[spdx], "LICENSE is not the unmodified canonical text"
    assert "## License" in (REPO / "README.md").read_text()


def test_comfy_node_validate_passes(tmp_path):
    ruff_cache_before = (REPO / ".ruff_cache").exists()
    out = _run([sys.executable, "-m", "comfy_cli", "--skip-prompt", "--no-json", "node", "validate"], REPO, _env(tmp_path))
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    assert "All validation checks passed" in log, log
    # comfy-cli only warns (and then drops the field) on a bad license / requires-comfyui / classifier,
    # and its ruff security check (exec, eval, `a; b` statements) always exits 0: treat both as failures.
    assert "Warning" not in log and "Security warnings found" not in log, log
    assert ruff_cache_before or not (REPO / ".ruff_cache").exists(), "validate wrote .ruff_cache into the repository"


def _check_members(zf: zipfile.ZipFile, tracked: list):
    infos = zf.infolist()
    names = [i.filename for i in infos]
    assert len(names) == len(set(names))
    for name in names:
        parts = name.split("/")
        assert not name.endswith(WEIGHT_SUFFIXES) or name.startswith(PROXY_WEIGHTS), f"weights in the archive: {name}"
        assert parts[0] not in ("out", ".venv", "venv", ".git", ".github", ".ci"), name
        assert not name.startswith("bench/out/") and "__pycache__" not in parts and "out" not in parts[:-1], name
        assert not name.endswith((".pyc", ".log", ".zip")), name
    # What a ComfyUI user needs is there.
    for required in ("__init__.py", "pyproject.toml", "LICENSE", "README.md", "requirements.txt", "install.py",
                     "quant_core/__init__.py", "quant_core/__main__.py"):
        assert required in names, f"{required} missing"
    assert any(n.startswith(PROXY_WEIGHTS) and n.endswith(".safetensors") for n in names), "proxy weights missing"
    for pattern in ("workflows/*.json", "web/*.js", "nodes/*.py", "bench/proxy/*.py"):
        expected = {f for f in tracked if Path(f).match(pattern)}
        assert expected and expected <= set(names), f"{pattern}: missing {sorted(expected - set(names))}"
    # Small.
    total = sum(i.file_size for i in infos)
    assert total <= MAX_TOTAL_BYTES, f"{total / 2**20:.1f} MiB uncompressed"
    big = [(i.filename, i.file_size) for i in infos
           if i.file_size > MAX_OTHER_FILE_BYTES and not i.filename.startswith(PROXY_WEIGHTS)]
    assert not big, f"large files in the archive: {big}"
    return names, total


def test_publish_archive_members(tmp_path):
    """The archive `comfy node pack` / `publish` builds from this checkout (git-tracked files - .comfyignore)."""
    tracked = _git_files()
    zf = _pack(REPO, tmp_path / "node.zip", _env(tmp_path))
    names, total = _check_members(zf, tracked)
    assert set(names) <= set(tracked), "only git-tracked files ship (includes is empty)"
    print(f"\narchive: {len(names)} files, {total / 2**20:.2f} MiB uncompressed, "
          f"{(tmp_path / 'node.zip').stat().st_size / 2**20:.2f} MiB zipped")


def test_archive_outside_git_skips_local_files(tmp_path):
    """Without git (e.g. a source tarball) comfy-cli zips the whole folder minus .comfyignore: a checkout
    with outputs, a venv, caches, host checkouts and stray checkpoints still gives the same archive."""
    tracked = _git_files()
    tree = tmp_path / "tree"
    for rel in [*tracked, ".comfyignore"]:  # .comfyignore is read from the working folder, tracked or not
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, tree / rel)
    junk = ["out/demo/side_by_side.png", "bench/out/fidelity.json", ".venv/bin/python", ".venv/lib/x.py",
            "venv/pyvenv.cfg", "nodes/__pycache__/patching.cpython-311.pyc", "quant_core/x.pyc", ".pytest_cache/v",
            ".ruff_cache/x", "tests/hosts/comfyui/main.py", "tests/hosts/comfyui/.fidelityquant_snapshot",
            "model-w4a8.safetensors", "bench/proxy/weights/old.ckpt", "checkpoints/sdxl.safetensors",
            "unet.pt", "demo.log", "node.zip", ".env", "fidelityquant.egg-info/PKG-INFO", "dist/x.whl"]
    for rel in junk:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(b"x" * 16)
    env = _env(tmp_path)
    env["GIT_DIR"] = str(tmp_path / "no-git")  # make `git ls-files` fail even if tmp sits inside a repository
    zf = _pack(tree, tmp_path / "walk.zip", env)
    names, _ = _check_members(zf, tracked)
    with _pack(REPO, tmp_path / "git.zip", _env(tmp_path)) as from_git:
        assert sorted(names) == sorted(from_git.namelist())
