"""FidelityQuant for AUTOMATIC1111 / Forge: the txt2img / img2img accordion, the FidelityQuant tab, the API routes.

A1111 and Forge load every ``scripts/*.py`` of an extension with the extension folder on ``sys.path``, so
the glue package (``fidelityquant_webui``) and ``quant_core`` import from here. All host work is in
``fidelityquant_webui/a1111.py`` / ``forge.py``; this file only declares the UI and routes.
"""
import traceback

import gradio as gr

from modules import script_callbacks, scripts, shared

from fidelityquant_webui import common

try:  # Forge has its own backend; A1111 has none
    import modules_forge  # noqa: F401
    from fidelityquant_webui import forge as glue
except ImportError:
    from fidelityquant_webui import a1111 as glue


def file_choices() -> list:
    return common.list_files(glue.folder())


class FidelityQuantScript(scripts.Script):
    sorting_priority = 20

    def title(self):
        return "FidelityQuant"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        tab = "img2img" if is_img2img else "txt2img"
        with gr.Accordion("FidelityQuant", open=False, elem_id=f"fidelityquant_{tab}"):
            with gr.Row():
                file = gr.Dropdown(label="Quantized UNet (models/fidelity_quant)", choices=file_choices(),
                                   value=common.NONE, elem_id=f"fidelityquant_{tab}_file")
                refresh = gr.Button(value="\U0001f504", elem_id=f"fidelityquant_{tab}_refresh")
            refresh.click(fn=lambda: gr.update(choices=file_choices()), inputs=[], outputs=[file])
        self.infotext_fields = [(file, lambda params: params.get(common.INFOTEXT_KEY, common.NONE))]
        self.paste_field_names = [common.INFOTEXT_KEY]
        return [file]

    def before_process(self, p, *args):
        glue.deactivate()  # a job that failed after `process` left its layers in: put the float ones back

    def process(self, p, file=common.NONE, *args):
        glue.activate(p, file)

    def process_before_every_sampling(self, p, file=common.NONE, *args, **kwargs):
        before = getattr(glue, "before_sampling", None)
        if before is not None:
            before(p, file)

    def postprocess_batch(self, p, *args, **kwargs):
        after = getattr(glue, "after_batch", None)
        if after is not None:
            after(p)

    def postprocess(self, p, processed, *args):
        glue.deactivate()


# ------------------------------------------------------------------------------------------ the tab

def run_calibration(prompts, negative, steps, cfg, sampler_name, width, height, seed, preset, timestep_groups,
                    bits_budget, consistency_pass, memory_limit_mb, filename):
    from modules.call_queue import queue_lock

    try:
        with queue_lock:
            name, report = glue.calibrate(prompts, negative, steps, cfg, sampler_name, width, height, seed, preset,
                                          timestep_groups, bits_budget, consistency_pass, memory_limit_mb, filename)
    except Exception as exc:  # shown in the report box
        if not isinstance(exc, ValueError) and "interrupted" not in str(exc):
            traceback.print_exc()
        return f"FidelityQuant: calibration failed: {exc}"
    return f"saved {name}\n\n{report}"


def sampler_names() -> list:
    from modules import sd_samplers

    return [s.name for s in sd_samplers.visible_samplers()] or ["Euler"]


def on_ui_tabs():
    with gr.Blocks(analytics_enabled=False) as tab:
        gr.Markdown("Calibrates the UNet of the checkpoint loaded now and writes `models/fidelity_quant/<name>"
                    ".safetensors`. Choose the file in the FidelityQuant accordion of txt2img / img2img.")
        with gr.Row():
            with gr.Column():
                prompts = gr.Textbox(label="Calibration prompts (one per line)", value=common.default_prompts(),
                                     lines=8)
                negative = gr.Textbox(label="Negative prompt", value="")
                with gr.Row():
                    steps = gr.Slider(label="Steps", minimum=1, maximum=150, step=1, value=20)
                    cfg = gr.Slider(label="CFG scale", minimum=1.0, maximum=30.0, step=0.5, value=7.0)
                    sampler = gr.Dropdown(label="Sampler", choices=sampler_names(), value="Euler")
                with gr.Row():
                    width = gr.Slider(label="Width", minimum=64, maximum=2048, step=8, value=512)
                    height = gr.Slider(label="Height", minimum=64, maximum=2048, step=8, value=512)
                    seed = gr.Number(label="Seed (prompt i uses seed + i)", value=0, precision=0)
                with gr.Row():
                    preset = gr.Dropdown(label="Preset", choices=common.UI_PRESETS, value="W8A8")
                    groups = gr.Slider(label="Timestep groups", minimum=1, maximum=16, step=1, value=4)
                    budget = gr.Slider(label="Bits budget (W4A8-mixed)", minimum=4.1, maximum=8.0, step=0.1,
                                       value=4.5)
                with gr.Row():
                    consistency = gr.Checkbox(label="Consistency pass", value=True)
                    memory = gr.Slider(label="Memory limit (MB)", minimum=16, maximum=8192, step=16, value=256)
                    filename = gr.Textbox(label="File name", value="fidelityquant")
                button = gr.Button("Calibrate", variant="primary")
            with gr.Column():
                report = gr.Textbox(label="Report", lines=24, interactive=False)
        button.click(fn=run_calibration, inputs=[prompts, negative, steps, cfg, sampler, width, height, seed, preset,
                                                 groups, budget, consistency, memory, filename], outputs=[report])
    return [(tab, "FidelityQuant", "fidelityquant")]


# ------------------------------------------------------------------------------------------ the API

def on_app_started(_demo, app):
    from fastapi import Body, HTTPException
    from modules.call_queue import queue_lock

    def files():
        return {"folder": glue.folder(), "files": file_choices()[1:],
                "checkpoint": getattr(getattr(shared.sd_model, "sd_checkpoint_info", None), "title", None)}

    def calibrate(payload: dict = Body(...)):
        args = dict(payload)
        try:
            with queue_lock:
                name, report = glue.calibrate(**args)
        except TypeError as exc:  # unknown or missing fields
            raise HTTPException(status_code=422, detail=f"FidelityQuant: {exc}") from exc
        except (ValueError, RuntimeError, FileExistsError) as exc:
            if not isinstance(exc, ValueError) and "interrupted" not in str(exc):
                traceback.print_exc()  # an unexpected failure: the console gets the whole trace
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        return {"file": name, "report": report}

    app.add_api_route("/fidelityquant/files", files, methods=["GET"])
    app.add_api_route("/fidelityquant/calibrate", calibrate, methods=["POST"])


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_app_started(on_app_started)
