"""Repository foundation: the ComfyUI entry imports without ComfyUI; install.py is safe to import."""
import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_root_package_imports_without_comfyui():
    code = ("import importlib.util, sys; "
            f"spec = importlib.util.spec_from_file_location('fq_root', r'{REPO / '__init__.py'}', "
            f"submodule_search_locations=[r'{REPO}']); m = importlib.util.module_from_spec(spec); "
            "spec.loader.exec_module(m); "
            "assert 'comfy' not in sys.modules and 'torch' not in sys.modules; "
            "print(type(m.NODE_CLASS_MAPPINGS).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "dict"


def test_quant_core_never_imports_frameworks():
    for path in (REPO / "quant_core").rglob("*.py"):
        text = path.read_text()
        for banned in ("import comfy", "from comfy", "import modules.", "from modules import", "import folder_paths"):
            assert banned not in text, f"{path.name} imports a framework ({banned!r})"


def test_install_script_reads_requirements_without_installing_on_import():
    install = _load("fq_install", REPO / "install.py")
    reqs = install.requirements()
    assert "safetensors>=0.4" in reqs and "tqdm" in reqs
    assert not any(r.split("=")[0].split(">")[0].strip() == "torch" for r in reqs), "torch must never be pinned"
