"""Importing a real ComfyUI checkout for the integration tests (env COMFYUI_PATH), or skipping with the reason.

One place for what every ComfyUI test needs first: the checkout on sys.path (plus its optional
``_shims`` folder, e.g. a local pure-Python torchvision), ComfyUI's ``--cpu`` switch set before
``comfy.model_management`` is imported when there is no GPU, and a skip that names the problem.
"""
import importlib
import os
import sys
from pathlib import Path

import pytest
import torch


def comfyui_path(purpose: str) -> Path:
    """The checkout named by COMFYUI_PATH; skips (naming ``purpose``) when unset or not a ComfyUI folder."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip(f"COMFYUI_PATH is not set (point it at a ComfyUI checkout to run {purpose})")
    if not os.path.isdir(os.path.join(path, "comfy")):
        pytest.skip(f"COMFYUI_PATH={path} has no comfy/ package")
    return Path(path)


def import_comfyui(purpose: str, *modules: str) -> Path:
    """Put the checkout on sys.path and import ``modules`` (e.g. "comfy.sd"); skip with the reason on failure."""
    path = comfyui_path(purpose)
    for extra in (str(path), str(path / "_shims")):
        if os.path.isdir(extra) and extra not in sys.path:
            sys.path.append(extra)
    try:
        if "comfy.model_management" not in sys.modules:
            import comfy.cli_args
            if not torch.cuda.is_available():
                comfy.cli_args.args.cpu = True  # read when comfy.model_management is imported
        for name in modules:
            importlib.import_module(name)
    except Exception as exc:  # missing dependency or an incompatible checkout
        pytest.skip(f"ComfyUI at {path} is not importable: {type(exc).__name__}: {exc}")
    return path
