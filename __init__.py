"""FidelityQuant: ComfyUI custom-node entry point.

ComfyUI imports this package from custom_nodes/. It must import cleanly without ComfyUI (tests import
it too), so nothing heavy happens here. The engine lives in quant_core/ and never imports ComfyUI.
The node classes (nodes/) are not built yet: until they are, ComfyUI sees an empty mapping.
"""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
