"""oneDNN int8 ops on CPU: the prepacked int8 linear, and the int8 conv's shape rule for torch.compile.

``torch.ops.onednn.qlinear_prepack`` reorders the int8 (N, K) weight once into the blocked layout that
AMX / VNNI microkernels read; ``qlinear_pointwise`` then runs int8 x int8 with the dequantize and bias
fused into its epilogue. ``torch._int_mm`` repacks the weight on every call and writes int32 that a
separate pass rescales, which is why it loses to bf16 on AMX machines while the prepacked op wins.

The activation scale is passed per call as a tensor (the op's ``.tensor`` overload): one packed weight
serves every timestep group, and nothing has to be read back to Python, so the layer traces under
``torch.compile`` without a graph break.
"""
from __future__ import annotations

import functools
import logging
import time

import torch

from .compat import is_compiling

log = logging.getLogger("fidelityquant")


def _op_available() -> bool:
    ops = torch.ops.onednn
    if not (hasattr(ops, "qlinear_prepack") and hasattr(ops, "qlinear_pointwise")):
        return False
    return "tensor" in ops.qlinear_pointwise.overloads()


def prepack(w8: torch.Tensor) -> torch.Tensor:
    """The int8 (N, K) weight in oneDNN's blocked layout (an opaque tensor; rebuild it when the codes change)."""
    return torch.ops.onednn.qlinear_prepack(w8.contiguous(), None)


def _linear(qx: torch.Tensor, scale: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor,
            w_zero: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    zero = torch.zeros((), dtype=torch.int64, device=qx.device)
    return torch.ops.onednn.qlinear_pointwise.tensor(
        qx, scale, zero, packed, w_scale, w_zero, bias, 1.0, 0, torch.float32, "none", [], "")


def _register_linear_op():
    """The op as a custom op of this package: Inductor lowers ``qlinear_pointwise`` only for a weight it
    prepacked itself (a graph constant), so ours must reach it as an opaque call. None before torch 2.4."""
    if not hasattr(torch.library, "custom_op"):
        return None
    op = torch.library.custom_op("fidelityquant::onednn_qlinear", mutates_args=())(_linear)
    op.register_fake(lambda qx, scale, packed, w_scale, w_zero, bias: qx.new_empty(
        (*qx.shape[:-1], w_scale.shape[0]), dtype=torch.float32))
    return op


_LINEAR_OP = _register_linear_op() if _op_available() else None


def linear(qx: torch.Tensor, scale: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor,
           w_zero: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """float32 (M, N) = (qx * scale) @ (w8 * w_scale)^T + bias, for int8 codes ``qx`` (M, K) with zero point 0.

    ``scale``: 0-d float32 tensor; ``w_zero``: int64 zeros (N,) (the weight is symmetric).
    """
    if _LINEAR_OP is not None and is_compiling():
        return _LINEAR_OP(qx, scale, packed, w_scale, w_zero, bias)
    return _linear(qx, scale, packed, w_scale, w_zero, bias)  # eager: no custom-op dispatch cost


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether this torch has the prepacked int8 linear with per-call tensor scales, and it runs here."""
    if not _op_available():
        log.info("FidelityQuant: torch %s has no oneDNN prepacked int8 linear", torch.__version__)
        return False
    try:
        w8 = torch.ones(16, 32, dtype=torch.int8)
        out = linear(torch.ones(4, 32, dtype=torch.int8), torch.tensor(0.5), prepack(w8), torch.ones(16),
                     torch.zeros(16, dtype=torch.int64), None)
    except (RuntimeError, TypeError) as exc:
        log.info("FidelityQuant: torch %s's oneDNN int8 linear is not usable here (%s)", torch.__version__,
                 str(exc).split("\n")[0])
        return False
    return bool((out == 16.0).all())


def cpu_seconds(fn, repeats: int = 3) -> float:
    """Best CPU time of one call of ``fn`` (process time: less disturbed by other processes on a shared
    machine than wall time)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def conv_takes_tensor_scale() -> bool:
    """Whether qconv2d_pointwise takes the activation scale as a tensor; torch.compile then also needs its shape
    rule, which torch registers for the float-scale overload only, so the same rule is registered for it."""
    op = getattr(torch.ops.onednn, "qconv2d_pointwise", None)
    if op is None or "tensor" not in op.overloads():
        return False
    try:
        torch.library.register_fake("onednn::qconv2d_pointwise.tensor")(
            lambda qx, x_scale, x_zero, *rest: op.default(qx, 1.0, 0, *rest))
    except Exception as exc:  # noqa: BLE001 - a torch that has its own rule (or refuses) keeps it
        log.debug("FidelityQuant: no shape rule registered for qconv2d_pointwise.tensor (%s)", exc)
    return True


# Decided at import: torch.compile cannot trace the overload query itself.
