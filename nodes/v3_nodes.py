"""The same four nodes on ComfyUI's V3 node API (``comfy_api.latest``); imported only where it exists.

Schemas are built from the ``NodeSpec`` declarations in ``fidelity_nodes.py`` and ``execute`` calls the
same plain functions as the V1 classes, so the two APIs cannot drift apart.
"""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import fidelity_nodes as fn

_TYPES = {"MODEL": io.Model, "CLIP": io.Clip, "IMAGE": io.Image, "STRING": io.String, "INT": io.Int,
          "FLOAT": io.Float, "BOOLEAN": io.Boolean}


def _type(kind: str):
    return _TYPES.get(kind) or io.Custom(kind)


def _input(name: str, kind, opts: dict):
    if isinstance(kind, (list, tuple)):
        return io.Combo.Input(name, options=list(kind), **opts)
    return _type(kind).Input(name, **opts)


def schema(spec: fn.NodeSpec) -> io.Schema:
    return io.Schema(
        node_id=spec.node_id, display_name=spec.display_name, category=fn.CATEGORY, description=spec.description,
        inputs=[_input(*entry) for entry in spec.inputs()],
        outputs=[_type(kind).Output(display_name=name, tooltip=tip) for kind, name, tip in spec.outputs],
        is_output_node=spec.output_node)


def _shown(*outputs, text: str) -> io.NodeOutput:
    return io.NodeOutput(*outputs, ui={"text": [text]})  # same ui payload as the V1 nodes (web/ reads "text")


class CalibrateAndQuantizeV3(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(fn.CALIBRATE)

    @classmethod
    def execute(cls, **inputs):
        model, result, report = fn.calibrate_and_quantize(**inputs)
        return _shown(model, result, report, text=report)


class SaveQuantizedUNetV3(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(fn.SAVE)

    @classmethod
    def execute(cls, quant_result, filename):
        return io.NodeOutput(ui={"text": [fn.save_quantized(quant_result, filename)]})


class LoadQuantizedUNetV3(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(fn.LOAD)

    @classmethod
    def execute(cls, model, file):
        model, report = fn.load_quantized(model, file)
        return _shown(model, report, text=report)


class CompareImagesV3(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(fn.COMPARE)

    @classmethod
    def execute(cls, reference, images):
        report, difference = fn.compare_images(reference, images)
        return _shown(report, difference, text=report)


NODES = [CalibrateAndQuantizeV3, SaveQuantizedUNetV3, LoadQuantizedUNetV3, CompareImagesV3]


class FidelityQuantExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> FidelityQuantExtension:
    return FidelityQuantExtension()
