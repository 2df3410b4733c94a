"""Integer kernels: activation quantization, int8 GEMM and int8 conv, with backend selection.

Backends (chosen once per device / layer shape, logged once, exposed as ``QuantLinear.backend``):

- ``int_mm``  ``torch._int_mm`` (int8 x int8 -> int32). CUDA, or a CPU with AVX512-VNNI / AVX-VNNI /
              AMX where PyTorch routes it through oneDNN. Elsewhere on CPU it is a scalar loop that is
              20-40x slower than fp32, so it is never used there.
- ``onednn``  CPU linear: ``onednn.qlinear_prepack`` once per weight, ``qlinear_pointwise`` per call
              (``onednn_ops.py``). On CPUs with int8 dot products, linear layers use whichever of
              this and ``int_mm`` measured faster once per process (``cpu_linear_choice``).
- ``onednn``  CPU conv: ``onednn.qconv_prepack`` once, ``onednn.qconv2d_pointwise`` per call (uint8
              channels-last activations, zero point 128, fused dequantize + bias).
- ``im2col``  conv as unfold + ``_int_mm`` (CUDA, or a fast-int8 CPU without the oneDNN ops).
- ``float``   exact emulation: the same int8 codes multiplied in float32. Used where integer math
              would be slow or unsupported; results equal the integer paths up to float rounding.

Every path quantizes activations with the same rule, so switching backend never changes fidelity.
Set ``FIDELITYQUANT_BACKEND=float`` to force the emulation path everywhere.
"""
from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F

from . import onednn_ops

log = logging.getLogger("fidelityquant")

ACT_QMIN, ACT_QMAX = -128, 127
# Unmeasured policy (no GPU was available when this was written): explicit im2col + _int_mm is
# expected to lose to cuDNN fp16 on large latents, so CUDA convs above this many output pixels
# per image use the float path. Re-measure with bench/kernels.py --device cuda.
CUDA_IM2COL_MAX_PIXELS = 32 * 32
_CUDA_INT_MM_MIN_ROWS = 17  # _int_mm on CUDA needs a.size(0) > 16


@functools.lru_cache(maxsize=None)
def _forced_backend() -> str | None:
    value = os.environ.get("FIDELITYQUANT_BACKEND", "").strip().lower()
    if value not in ("", "float"):
        raise ValueError(f"FIDELITYQUANT_BACKEND={value!r}: only 'float' can be forced")
    return value or None


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    """The CPU's instruction-set flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.lru_cache(maxsize=None)
def cpu_has_fast_int8() -> bool:
    """True when this CPU has int8 dot-product instructions that oneDNN uses for _int_mm."""
    fast = bool(cpu_flags() & INT8_DOT_FLAGS)
    log.info("FidelityQuant: CPU int8 dot-product instructions %s -> CPU int8 GEMM %s",
             "found" if fast else "not found", "via torch._int_mm" if fast else "emulated in float32")
    return fast


@functools.lru_cache(maxsize=None)
def cpu_int_mm_available() -> bool:
    """Whether this torch runs ``torch._int_mm`` on CPU (torch 2.1, which AUTOMATIC1111 v1.10 ships, has
    it for CUDA only); where it does not, the CPU int8 paths that need it use the float emulation."""
    try:
        torch._int_mm(torch.ones(32, 32, dtype=torch.int8), torch.ones(32, 32, dtype=torch.int8))
    except (RuntimeError, NotImplementedError, AttributeError):
        log.info("FidelityQuant: torch %s has no CPU torch._int_mm; CPU int8 GEMMs are emulated in float32",
                 torch.__version__)
        return False
    return True


@functools.lru_cache(maxsize=None)
def onednn_conv_available() -> bool:
    """Whether oneDNN's int8 conv ops exist with the signature used here (torch 2.1's take other arguments)."""
    ops = torch.ops.onednn
    if not (hasattr(ops, "qconv_prepack") and hasattr(ops, "qconv2d_pointwise")):
        return False
    try:
        w_scale = torch.ones(16)
        packed = onednn_prepack(torch.ones(16, 16, 1, 1, dtype=torch.int8), w_scale, (1, 1), (0, 0), (1, 1))
        conv_onednn(torch.ones(1, 16, 2, 2), torch.tensor(1.0), packed, w_scale, torch.zeros(16, dtype=torch.int64),
                    None, (1, 1), (0, 0), (1, 1))
    except (RuntimeError, TypeError) as exc:
        log.info("FidelityQuant: torch %s's oneDNN int8 conv is not usable here (%s)", torch.__version__,
                 str(exc).split("\n")[0])
        return False
    return True


def linear_backend(device: torch.device, in_features: int, out_features: int) -> str:
    if _forced_backend():
        return "float"
    if device.type == "cuda":
        # _int_mm's CUDA constraints on K and N are fixed per layer; M is padded per call.
        return "int_mm" if in_features % 8 == 0 and out_features % 8 == 0 else "float"
    if device.type == "cpu" and cpu_has_fast_int8():
        return cpu_linear_choice()[0]
    return "float"


# A typical SD projection at a small latent: large enough to separate the kernels, small enough that
# measuring costs tens of milliseconds once per process.
LINEAR_PROBE_SHAPE = (512, 320, 1280)


@functools.lru_cache(maxsize=None)
def cpu_linear_choice() -> tuple:
    """(backend, reason): the CPU int8 linear path of this process, from the CPU's flags and availability
    of the ops, and, when both ``onednn`` and ``int_mm`` run here, one measurement of each on
    ``LINEAR_PROBE_SHAPE`` (quantize + GEMM + epilogue, CPU time). Reports show the reason."""
    flags = "/".join(sorted(cpu_flags() & INT8_DOT_FLAGS)) or "no int8 dot-product flags"
    usable = [name for name, ok in (("onednn", onednn_ops.available()), ("int_mm", cpu_int_mm_available()))
              if ok]
    if len(usable) < 2:
        choice = usable[0] if usable else "float"
        reason = f"{flags}; torch {torch.__version__} runs {' '.join(usable) or 'neither int8 linear op'}"
    else:
        rows, k, n = LINEAR_PROBE_SHAPE
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(rows, k, generator=gen)
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        w_scale, bias, scale = torch.full((n,), 1e-3), torch.zeros(n), torch.tensor(0.03)
        packed, zeros = onednn_ops.prepack(w8), torch.zeros(n, dtype=torch.int64)
        times = {
            "int_mm": onednn_ops.cpu_seconds(
                lambda: rescale(int8_matmul(quantize_static(x, scale), w8, "int_mm"), w_scale * scale, bias)),
            "onednn": onednn_ops.cpu_seconds(
                lambda: onednn_ops.linear(quantize_static(x, scale), scale, packed, w_scale, zeros, bias)),
        }
        choice = min(times, key=times.get)
        reason = f"{flags}; {rows}x{k}x{n}: " + ", ".join(f"{name} {sec * 1e3:.2f} ms" for name, sec in times.items())
    log.info("FidelityQuant: CPU int8 linear layers use %s (%s)", choice, reason)
    return choice, reason


def conv_backend(device: torch.device, in_features: int, out_features: int, out_pixels: int) -> str:
    if _forced_backend():
        return "float"
    if device.type == "cpu":
        if cpu_has_fast_int8():
            if onednn_conv_available():
                return "onednn"
            return "im2col" if cpu_int_mm_available() else "float"
        return "float"
    if device.type == "cuda":
        if in_features % 8 or out_features % 8 or out_pixels > CUDA_IM2COL_MAX_PIXELS:
            return "float"
        return "im2col"
    return "float"


_logged: set = set()


def log_backend_once(kind: str, device: torch.device, backend: str) -> None:
    key = (kind, device.type, backend)
    if key not in _logged:
        _logged.add(key)
        log.info("FidelityQuant: %s layers on %s use the %s path", kind, device.type, backend)


# ----------------------------------------------------------------------------- activations

def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 codes round(x / scale) clamped to [-128, 127]; ``scale`` is a 0-d float32 tensor.

    Works in float32 whatever the input dtype (bf16 has too few mantissa bits to round x / s).
    In-place ops after the first keep it to one allocation.
    """
    xf = x.to(torch.float32) if x.dtype != torch.float32 else x
    return torch.mul(xf, scale.reciprocal()).round_().clamp_(ACT_QMIN, ACT_QMAX).to(torch.int8)


def fake_quantize_static(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``quantize_static`` and back to float32: what a static-scale layer's GEMM sees (fitting uses it,
    so the scales are chosen for exactly the rounding the kernels run)."""
    scale_t = torch.tensor(scale, dtype=torch.float32)
    return quantize_static(x, scale_t).to(torch.float32).mul_(scale_t)


def quantize_dynamic_rows(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) symmetric int8; returns (codes, float32 scales of shape (M, 1))."""
    xf = x2d.to(torch.float32)
    scale = xf.abs().amax(dim=1, keepdim=True).clamp_min_(1e-8).div_(ACT_QMAX)
    return xf.div(scale).round_().clamp_(ACT_QMIN, ACT_QMAX).to(torch.int8), scale


# ----------------------------------------------------------------------------- GEMM

def int8_matmul(qx: torch.Tensor, w8: torch.Tensor, backend: str) -> torch.Tensor:
    """(M, K) int8 @ (N, K)^T int8 -> (M, N) accumulators (int32, or float32 on the float path)."""
    if backend == "float":
        return qx.to(torch.float32) @ w8.to(torch.float32).t()
    rows = qx.shape[0]
    if qx.device.type == "cuda" and rows < _CUDA_INT_MM_MIN_ROWS:
        padded = F.pad(qx, (0, 0, 0, _CUDA_INT_MM_MIN_ROWS - rows))
        return torch._int_mm(padded, w8.t())[:rows]
    return torch._int_mm(qx, w8.t())


def rescale(acc: torch.Tensor, col_scale: torch.Tensor, bias: torch.Tensor | None,
            row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """float32 output = acc * row_scale * col_scale + bias, in as few passes as possible."""
    if row_scale is not None:
        out = acc.to(torch.float32).mul_(row_scale)
        return out.mul_(col_scale).add_(bias) if bias is not None else out.mul_(col_scale)
    if bias is None:
        return torch.mul(acc, col_scale)
    return torch.addcmul(bias, acc, col_scale)  # one pass: int32 in, float32 out


# ----------------------------------------------------------------------------- conv

def onednn_prepack(w8: torch.Tensor, w_scale: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    """Prepack an int8 (N, C, kh, kw) weight for qconv2d_pointwise.

    The activation scale is passed per call, so one packed weight serves every timestep group
    (checked in tests: packing with x_scale=1 and calling with the real scale is exact).
    """
    return torch.ops.onednn.qconv_prepack(
        w8.contiguous(), w_scale.to(torch.float32), 1.0, 0, list(stride), list(padding),
        list(dilation), 1, None)


_CONV_TENSOR_SCALE = onednn_ops.conv_takes_tensor_scale()


def conv_onednn(x: torch.Tensor, scale: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor,
                w_zero: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation) -> torch.Tensor:
    """int8 conv on CPU through oneDNN; ``scale`` a 0-d float32 tensor; returns float32 in channels-last layout."""
    xf = x.to(torch.float32) if x.dtype != torch.float32 else x
    # uint8 with zero point 128 is the same grid as int8 [-128, 127].
    qx = torch.mul(xf, scale.reciprocal()).round_().add_(128).clamp_(0, 255).to(torch.uint8)
    qx = qx.contiguous(memory_format=torch.channels_last)
    op = torch.ops.onednn.qconv2d_pointwise
    tail = (bias, list(stride), list(padding), list(dilation), 1, 1.0, 0, torch.float32, "none", [], "")
    if _CONV_TENSOR_SCALE:  # nothing read back to Python, so it traces without a graph break
        zero = torch.full((), 128, dtype=torch.int64, device=x.device)
        return op.tensor(qx, scale, zero, packed, w_scale, w_zero, *tail)
    return op(qx, float(scale), 128, packed, w_scale, w_zero, *tail)


def conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_out_hw(height: int, width: int, kernel_size, stride, padding, dilation) -> tuple[int, int]:
    """Output height and width of a 2-D convolution (the same rule as ``torch.nn.Conv2d``)."""
    return (conv_out_size(height, kernel_size[0], stride[0], padding[0], dilation[0]),
            conv_out_size(width, kernel_size[1], stride[1], padding[1], dilation[1]))


def conv_im2col(qx: torch.Tensor, w8_2d: torch.Tensor, kernel_size, stride, padding, dilation,
                backend: str) -> torch.Tensor:
    """int8 conv as im2col + GEMM. ``qx`` int8 (B, C, H, W); ``w8_2d`` int8 (N, C*kh*kw).

    Returns accumulators shaped (B*Ho*Wo, N) plus nothing else; the caller rescales and reshapes.
    """
    batch, channels, height, width = qx.shape
    if tuple(kernel_size) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0):
        cols = qx.permute(0, 2, 3, 1).reshape(-1, channels)
    else:
        # unfold has no int8 kernel; int8 values are exact in fp16 / fp32.
        unfold_dtype = torch.float16 if qx.device.type == "cuda" else torch.float32
        cols = F.unfold(qx.to(unfold_dtype), kernel_size, dilation=dilation, padding=padding, stride=stride)
        cols = cols.transpose(1, 2).reshape(-1, cols.shape[1]).to(torch.int8)
    return int8_matmul(cols.contiguous(), w8_2d, backend)
