"""Writes the example workflows in both ComfyUI formats from one description per graph.

    python workflows/make_workflows.py          # rewrite workflows/*.json
    python workflows/make_workflows.py --check  # exit 1 if a committed file differs

UI format (drag into ComfyUI): nodes with positions, sizes, typed input/output slots, links
``[id, from_node, from_slot, to_node, to_slot, type]`` and ``widgets_values`` in widget order
(KSampler's seed is followed by its "control after generate" value). API format (``POST /prompt``):
``{node_id: {"class_type", "inputs", "_meta"}}`` with links as ``[from_node, from_slot]``.
Plain Python, no ComfyUI needed; the node signatures below mirror ComfyUI 0.3.64's nodes.py and
nodes/fidelity_nodes.py (tests/test_comfyui_server.py checks them against a live /object_info).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_PROMPTS = (HERE.parent / "nodes" / "default_prompts.txt").read_text().strip()

# class_type -> (link inputs [(name, type)], widget names in order, outputs [(name, type)])
SIGNATURES = {
    "CheckpointLoaderSimple": ([], ["ckpt_name"], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CLIPTextEncode": ([("clip", "CLIP")], ["text"], [("CONDITIONING", "CONDITIONING")]),
    "CLIPTextEncodeSDXL": ([("clip", "CLIP")], ["width", "height", "crop_w", "crop_h", "target_width", "target_height",
                                                "text_g", "text_l"], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([], ["width", "height", "batch_size"], [("LATENT", "LATENT")]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")],
                 ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
                 [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], ["filename_prefix"], []),
    "PreviewImage": ([("images", "IMAGE")], [], []),
    "FidelityQuantCalibrate": (
        [("model", "MODEL"), ("clip", "CLIP")],
        ["prompts", "negative", "steps", "cfg", "sampler_name", "scheduler", "width", "height", "seed", "preset",
         "timestep_groups", "bits_budget", "consistency_pass", "memory_limit_mb"],
        [("model", "MODEL"), ("quant_result", "FQ_RESULT"), ("report", "STRING")]),
    "FidelityQuantSave": ([("quant_result", "FQ_RESULT")], ["filename"], []),
    "FidelityQuantLoad": ([("model", "MODEL")], ["file"], [("model", "MODEL"), ("report", "STRING")]),
    "FidelityQuantCompare": ([("reference", "IMAGE"), ("images", "IMAGE")], [],
                             [("report", "STRING"), ("difference", "IMAGE")]),
}
UI_ONLY_WIDGETS = {"control_after_generate"}  # front-end state, not a node input

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
SAMPLING = {"seed": 42, "control_after_generate": "fixed", "steps": 20, "cfg": 7.0, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0}
CALIBRATION = {"prompts": DEFAULT_PROMPTS, "negative": "blurry, low quality", "steps": 20, "cfg": 7.0,
               "sampler_name": "euler", "scheduler": "normal", "width": 512, "height": 512, "seed": 0,
               "preset": "W8A8", "timestep_groups": 4, "bits_budget": 4.5, "consistency_pass": True,
               "memory_limit_mb": 256}
POSITIVE = "a photograph of a lighthouse on a rocky coast at sunset, dramatic clouds"
NEGATIVE = "blurry, low quality"


def _node(id, type, pos, size, widgets=None, links=None, title=None):
    return {"id": id, "type": type, "pos": pos, "size": size, "widgets": widgets or {}, "links": links or {},
            "title": title}


def _prompt_nodes(first_id: int, clip_from: int, x: int, y: int) -> list:
    return [_node(first_id, "CLIPTextEncode", [x, y], [400, 150], {"text": POSITIVE}, {"clip": (clip_from, 1)},
                  "Positive prompt"),
            _node(first_id + 1, "CLIPTextEncode", [x, y + 190], [400, 150], {"text": NEGATIVE},
                  {"clip": (clip_from, 1)}, "Negative prompt"),
            _node(first_id + 2, "EmptyLatentImage", [x, y + 380], [315, 106],
                  {"width": 512, "height": 512, "batch_size": 1})]


def _sdxl_prompt_nodes(first_id: int, clip_from: int, x: int, y: int) -> list:
    """SDXL's text encode with its size / crop conditioning (the ADM input) and a 1024x1024 latent."""
    size = {"width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0, "target_width": 1024, "target_height": 1024}
    return [_node(first_id, "CLIPTextEncodeSDXL", [x, y], [400, 270], {**size, "text_g": POSITIVE, "text_l": POSITIVE},
                  {"clip": (clip_from, 1)}, "Positive prompt"),
            _node(first_id + 1, "CLIPTextEncodeSDXL", [x, y + 310], [400, 270],
                  {**size, "text_g": NEGATIVE, "text_l": NEGATIVE}, {"clip": (clip_from, 1)}, "Negative prompt"),
            _node(first_id + 2, "EmptyLatentImage", [x, y + 620], [315, 106],
                  {"width": 1024, "height": 1024, "batch_size": 1})]


def _calibrate_and_compare(checkpoint: str, prompt_nodes: list, calibration: dict) -> list:
    """Checkpoint -> Calibrate & Quantize -> KSampler, the float model sampled beside it on the same seed,
    both decoded, compared, saved, and the difference previewed."""
    y = prompt_nodes[-1]["pos"][1] + 180
    return [
        _node(1, "CheckpointLoaderSimple", [0, 300], [315, 98], {"ckpt_name": checkpoint}),
        *prompt_nodes,
        _node(5, "FidelityQuantCalibrate", [380, y], [420, 620], calibration, {"model": (1, 0), "clip": (1, 1)}),
        _node(6, "KSampler", [860, 0], [315, 262], dict(SAMPLING),
              {"model": (5, 0), "positive": (2, 0), "negative": (3, 0), "latent_image": (4, 0)},
              "KSampler (quantized)"),
        _node(7, "KSampler", [860, 320], [315, 262], dict(SAMPLING),
              {"model": (1, 0), "positive": (2, 0), "negative": (3, 0), "latent_image": (4, 0)},
              "KSampler (float)"),
        _node(8, "VAEDecode", [1220, 0], [210, 46], {}, {"samples": (6, 0), "vae": (1, 2)}, "Decode (quantized)"),
        _node(9, "VAEDecode", [1220, 320], [210, 46], {}, {"samples": (7, 0), "vae": (1, 2)}, "Decode (float)"),
        _node(10, "FidelityQuantCompare", [1220, 640], [420, 260], {}, {"reference": (9, 0), "images": (8, 0)}),
        _node(11, "SaveImage", [1480, 0], [300, 300], {"filename_prefix": "FidelityQuant/quantized"},
              {"images": (8, 0)}, "Save (quantized)"),
        _node(12, "SaveImage", [1800, 0], [300, 300], {"filename_prefix": "FidelityQuant/float"},
              {"images": (9, 0)}, "Save (float)"),
        _node(13, "PreviewImage", [1680, 640], [300, 300], {}, {"images": (10, 1)}, "Difference x4"),
    ]


GRAPHS = {
    # (1) SD1.x/2.x: calibrate, sample quantized and float on the same seed, compare.
    "1_calibrate_and_compare": _calibrate_and_compare(CHECKPOINT, _prompt_nodes(2, 1, 380, 0), dict(CALIBRATION)),
    # (2) checkpoint -> Load Quantized UNet (no calibration) -> KSampler
    "2_load_quantized": [
        _node(1, "CheckpointLoaderSimple", [0, 300], [315, 98], {"ckpt_name": CHECKPOINT}),
        *_prompt_nodes(2, 1, 380, 0),
        _node(5, "FidelityQuantLoad", [380, 560], [420, 260], {"file": "fidelityquant.safetensors"},
              {"model": (1, 0)}),
        _node(6, "KSampler", [860, 0], [315, 262], dict(SAMPLING),
              {"model": (5, 0), "positive": (2, 0), "negative": (3, 0), "latent_image": (4, 0)},
              "KSampler (quantized)"),
        _node(7, "VAEDecode", [1220, 0], [210, 46], {}, {"samples": (6, 0), "vae": (1, 2)}),
        _node(8, "SaveImage", [1480, 0], [300, 300], {"filename_prefix": "FidelityQuant/loaded"},
              {"images": (7, 0)}),
    ],
    # (3) Calibrate & Quantize -> Save Quantized UNet (models/fidelity_quant/fidelityquant.safetensors)
    "3_calibrate_and_save": [
        _node(1, "CheckpointLoaderSimple", [0, 100], [315, 98], {"ckpt_name": CHECKPOINT}),
        _node(2, "FidelityQuantCalibrate", [380, 0], [420, 620], dict(CALIBRATION),
              {"model": (1, 0), "clip": (1, 1)}),
        _node(3, "FidelityQuantSave", [860, 0], [420, 200], {"filename": "fidelityquant"},
              {"quant_result": (2, 1)}),
    ],
    # (4) workflow 1 for SDXL: CLIPTextEncodeSDXL's size / crop conditioning, 1024x1024, calibrated at 1024x1024.
    "4_sdxl_calibrate_and_compare": _calibrate_and_compare(SDXL_CHECKPOINT, _sdxl_prompt_nodes(2, 1, 380, 0),
                                                           dict(CALIBRATION, width=1024, height=1024)),
}


def _check(nodes: list) -> None:
    ids = {n["id"] for n in nodes}
    for n in nodes:
        inputs, widgets, _ = SIGNATURES[n["type"]]
        assert list(n["widgets"]) == widgets, (n["type"], list(n["widgets"]))
        assert set(n["links"]) == {name for name, _ in inputs}, (n["type"], n["links"])
        for src, slot in n["links"].values():
            assert src in ids and slot < len(SIGNATURES[next(m["type"] for m in nodes if m["id"] == src)][2])


def api_format(nodes: list) -> dict:
    _check(nodes)
    out = {}
    for n in nodes:
        inputs = {k: v for k, v in n["widgets"].items() if k not in UI_ONLY_WIDGETS}
        inputs.update({k: [str(src), slot] for k, (src, slot) in n["links"].items()})
        out[str(n["id"])] = {"class_type": n["type"], "inputs": inputs, "_meta": {"title": n["title"] or n["type"]}}
    return out


def _execution_order(nodes: list) -> dict:
    order, done = {}, set()
    while len(done) < len(nodes):
        for n in nodes:
            if n["id"] not in done and all(src in done for src, _ in n["links"].values()):
                order[n["id"]] = len(order)
                done.add(n["id"])
    return order


def ui_format(nodes: list) -> dict:
    _check(nodes)
    by_id = {n["id"]: n for n in nodes}
    links, out_links = [], {}
    for n in nodes:  # link ids in node then input-slot order
        inputs = SIGNATURES[n["type"]][0]
        for slot, (name, kind) in enumerate(inputs):
            src, src_slot = n["links"][name]
            link_id = len(links) + 1
            links.append([link_id, src, src_slot, n["id"], slot, kind])
            out_links.setdefault((src, src_slot), []).append(link_id)
    order = _execution_order(nodes)
    ui_nodes = []
    for n in nodes:
        inputs, _, outputs = SIGNATURES[n["type"]]
        entry = {"id": n["id"], "type": n["type"], "pos": n["pos"], "size": n["size"], "flags": {},
                 "order": order[n["id"]], "mode": 0}
        if inputs:
            link_of = {(l[3], l[4]): l[0] for l in links}
            entry["inputs"] = [{"name": name, "type": kind, "link": link_of[(n["id"], slot)]}
                               for slot, (name, kind) in enumerate(inputs)]
        if outputs:
            entry["outputs"] = [{"name": name, "type": kind, "links": out_links.get((n["id"], slot), []),
                                 "slot_index": slot} for slot, (name, kind) in enumerate(outputs)]
        if n["title"]:
            entry["title"] = n["title"]
        entry["properties"] = {"Node name for S&R": n["type"]}
        if n["widgets"]:
            entry["widgets_values"] = list(n["widgets"].values())
        ui_nodes.append(entry)
    assert set(by_id) == {e["id"] for e in ui_nodes}
    return {"last_node_id": max(by_id), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [40, 40]}}, "version": 0.4}


def files() -> dict:
    out = {}
    for name, nodes in GRAPHS.items():
        out[f"{name}.json"] = ui_format(nodes)
        out[f"{name}_api.json"] = api_format(nodes)
    return {name: json.dumps(data, indent=2) + "\n" for name, data in out.items()}


def main(argv: list) -> int:
    stale = []
    for name, text in files().items():
        path = HERE / name
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print("out of date (run python workflows/make_workflows.py):", ", ".join(stale))
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
