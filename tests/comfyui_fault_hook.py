"""Test-only ComfyUI custom node: injects one fault into one calibration phase of a running server.

Not part of the pack (ComfyUI never imports tests/): tests/test_comfyui_faults.py copies this file into
its temporary server's ``custom_nodes/fq_fault_hook/__init__.py`` and names a plan file in ``FQ_FAULT_PLAN``.
Before each phase event the hook reads the plan (JSON: ``phase``, ``action``, ``marker``), so one server
runs every case. It wraps quant_core's phase functions in the server process (their module attributes,
which the pipeline looks up at call time), so the library itself carries no test seam:

- ``capture`` / ``consistency``: the 2nd UNet call of the capture pass / of the consistency pass (whose
  float evaluation calls run beside it), through the progress callback the pipeline hands to ``capture``.
  The two are told apart by ``gram_passes`` (called once at the start of every ``quantize``) and
  ``fit_all`` (between them).
- ``fit``: the 3rd layer job of ``fit_all`` (its cancel check, which runs in the fitting threads).
- ``save``: after the safetensors bytes are written to the temporary file, before the rename.

``raise`` raises InjectedFault there. ``cancel`` writes the marker, then waits until ComfyUI's interrupt
flag is set (the test POSTs /interrupt when it sees the marker) and returns: the engine's own cancel check
then stops the run, so the interrupt lands inside that phase every time.
"""
import json
import os
import sys
import threading
import time

NODE_CLASS_MAPPINGS: dict = {}
_PACK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ComfyUI-FidelityQuant")
_lock = threading.Lock()
_state = {"phase": "capture", "count": {}}


class InjectedFault(RuntimeError):
    pass


def _plan() -> dict:
    try:
        with open(os.environ["FQ_FAULT_PLAN"]) as f:
            return json.load(f)
    except (KeyError, OSError, ValueError):
        return {}


def _event(phase: str, at: int) -> None:
    """The ``at``-th event of ``phase`` in this calibration: inject if the plan says so."""
    with _lock:
        count = _state["count"][phase] = _state["count"].get(phase, 0) + 1
    plan = _plan()
    if plan.get("phase") != phase or count != at:
        return
    with open(plan["marker"], "a") as f:
        f.write(f"{phase} {plan['action']} {time.time()}\n")
    if plan["action"] == "raise":
        raise InjectedFault(f"fault injected by the test in the {phase} phase")
    import comfy.model_management

    deadline = time.monotonic() + 120
    while not comfy.model_management.processing_interrupted():
        if time.monotonic() > deadline:
            raise InjectedFault(f"no interrupt arrived within 120 s in the {phase} phase")
        time.sleep(0.02)


def _install() -> None:
    if _PACK not in sys.path:
        sys.path.append(_PACK)
    from quant_core import artifact
    from quant_core.calibrate import capture, pipeline

    gram_passes, fit_all, real_capture, save_file = (pipeline.gram_passes, pipeline.fit_all, capture.capture,
                                                     artifact.save_file)

    def start(*args, **kwargs):
        with _lock:
            _state.update(phase="capture", count={})
        return gram_passes(*args, **kwargs)

    def fit(weights, captures, step_groups, bits_options, cfg, check_cancel=None, *args, **kwargs):
        _state["phase"] = "consistency"  # the next capture call is the consistency pass

        def check():
            _event("fit", 3)
            if check_cancel is not None:
                check_cancel()
        return fit_all(weights, captures, step_groups, bits_options, cfg, check, *args, **kwargs)

    def captured(unet, layers, runner, timesteps_from_call, steps_hint, memory_limit_bytes, progress=None,
                 *args, **kwargs):
        phase = _state["phase"]

        def report(done, total):
            _event(phase, 2)
            if progress is not None:
                progress(done, total)
        return real_capture(unet, layers, runner, timesteps_from_call, steps_hint, memory_limit_bytes, report,
                            *args, **kwargs)

    def save(tensors, path, metadata=None):
        save_file(tensors, path, metadata=metadata)
        _event("save", 1)

    pipeline.gram_passes, pipeline.fit_all, capture.capture, artifact.save_file = start, fit, captured, save


_install()
