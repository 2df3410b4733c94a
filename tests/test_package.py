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


def _engine_imports() -> dict:
    """quant_core module -> the quant_core modules it imports (static: every import statement, lazy ones too)."""
    import ast

    root = REPO / "quant_core"
    graph = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(max(0, node.level - 1)):
                    base = base.rpartition(".")[0]
                module = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                targets.add(module)
                targets.update(f"{module}.{a.name}" for a in node.names)  # "from . import formats"
        graph[name] = targets
    return {name: {t for t in targets if t in graph and t != name} for name, targets in graph.items()}


def test_engine_has_no_import_cycles_and_imports_no_host_bench_or_nodes():
    graph = _engine_imports()
    for path in (REPO / "quant_core").rglob("*.py"):
        text = path.read_text()
        for banned in ("import nodes", "from nodes", "import bench", "from bench", "import proxy"):
            assert banned not in text, f"{path} imports {banned.split()[-1]!r}: the engine depends on nothing outside it"
    # Package __init__ files only re-export; a cycle through them is not a dependency between modules.
    packages = {".".join(p.relative_to(REPO).parent.parts) for p in (REPO / "quant_core").rglob("__init__.py")}
    modules = {n: ts - packages for n, ts in graph.items() if n not in packages}
    state: dict = {}

    def visit(node, trail):
        state[node] = "open"
        for target in sorted(modules[node]):
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join(trail + [node, target]))
            if target not in state:
                visit(target, trail + [node])
        state[node] = "done"

    for name in sorted(modules):
        if name not in state:
            visit(name, [])


def test_engine_files_stay_small():
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in (REPO / "quant_core").rglob("*.py")}
    assert max(sizes.values()) <= 300, {k: v for k, v in sizes.items() if v > 300}
