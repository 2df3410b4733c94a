"""FidelityQuant: ComfyUI custom-node entry point.

ComfyUI imports this folder as a package from custom_nodes/. Without ComfyUI (tests, the CLI) it
imports nothing heavy and exports empty mappings. The engine, quant_core, never imports ComfyUI.

Node API, chosen at import time: where ``comfy_api.latest`` imports (ComfyUI with the V3 node API)
this module exports ``comfy_entrypoint`` and *no* ``NODE_CLASS_MAPPINGS``, because ComfyUI's loader
uses ``NODE_CLASS_MAPPINGS`` whenever a module has one and only then looks for ``comfy_entrypoint``
(docs/COMFYUI_FACTS.md, "V3 node API"). Older ComfyUI gets the V1 classes. Set
``FIDELITYQUANT_NODE_API=v1`` to force the V1 classes on a V3-capable ComfyUI.
"""
import logging
import os
import sys

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
WEB_DIRECTORY = "./web"

try:
    import folder_paths  # noqa: F401  (exists only inside ComfyUI)
except ImportError:
    folder_paths = None


def _v3_available() -> bool:
    if os.environ.get("FIDELITYQUANT_NODE_API", "").lower() == "v1":
        return False
    try:
        import comfy_api.latest  # noqa: F401
    except ImportError:
        return False
    except Exception as exc:  # present but broken: the V1 classes still work
        logging.warning("FidelityQuant: comfy_api.latest failed to import (%s); using the V1 node API", exc)
        return False
    return True


if folder_paths is not None:
    # quant_core is imported by absolute name; ComfyUI has its own top-level "nodes" module, so
    # ours is only ever imported relative to this package.
    _here = os.path.dirname(os.path.abspath(__file__))
    if _here not in sys.path:
        sys.path.append(_here)
    if _v3_available():
        from .nodes.v3_nodes import comfy_entrypoint  # noqa: F401
        del NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # else ComfyUI would load V1 and ignore V3
    else:
        from .nodes.fidelity_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811

__all__ = [name for name in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "comfy_entrypoint", "WEB_DIRECTORY")
           if name in globals()]
