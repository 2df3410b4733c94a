"""FidelityQuant: ComfyUI custom-node entry point.

ComfyUI imports this folder as a package from custom_nodes/. Without ComfyUI (tests, the CLI) it
imports nothing heavy and exports empty mappings. The engine, quant_core, never imports ComfyUI.
"""
import os
import sys

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
WEB_DIRECTORY = "./web"

try:
    import folder_paths  # noqa: F401  (exists only inside ComfyUI)
except ImportError:
    folder_paths = None

if folder_paths is not None:
    # quant_core is imported by absolute name; ComfyUI has its own top-level "nodes" module, so
    # ours is only ever imported relative to this package.
    _here = os.path.dirname(os.path.abspath(__file__))
    if _here not in sys.path:
        sys.path.append(_here)
    from .nodes.fidelity_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
