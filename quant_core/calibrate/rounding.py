"""Error-compensating weight rounding on a fixed quantization grid (the idea of GPTQ, Frantar et al. 2022).

Rounding every weight to its nearest code ("round to nearest", RTN) ignores that the layer's output
error depends on the inputs: what matters is ``||X (W - Q)^T||``, not ``||W - Q||``. GPTQ rounds the
columns of W one at a time and, after each, spreads that column's rounding error over the columns
not yet rounded, weighted by the inverse input Gram matrix ``H = X^T X`` -- the least-squares
correction given the inputs the layer really sees. At 4 bits this removes a large part of the
output error for the same storage format and the same runtime kernel.

Here the grid (the step of every weight: per-channel int8 scale, or channel scale x integer group
scale for int4) is fixed before rounding, so the result is exactly representable in the layer's
format and the rounding can be checked code by code. Rows (output channels) are independent, which
lets the caller pick a clipping ratio per channel by the same output error.
"""
from __future__ import annotations

import torch

BLOCK = 128          # columns updated together (lazy batch updates: same result, fewer passes)
DAMPING = 0.01       # fraction of the mean diagonal added to H: keeps the inverse stable with few rows


def input_gram(rows: torch.Tensor) -> torch.Tensor:
    """H = X^T X / n (float32, accumulated in float64) from captured input rows (n, K)."""
    x = rows.double()
    return ((x.t() @ x) / max(1, x.shape[0])).float()


class ErrorFeedbackRounder:
    """Prepared once per layer from its input Gram matrix H (K, K); rounds any weight on any grid.

    ``act_order`` rounds the columns with the largest input energy first (their errors can then be
    compensated by the most columns). Columns that never see a non-zero input are rounded to nearest
    (nothing depends on them).
    """

    def __init__(self, hessian: torch.Tensor, act_order: bool = True) -> None:
        h = hessian.float().clone()
        k = h.shape[0]
        diag = torch.arange(k)
        dead = h.diagonal() <= 0
        h[dead, dead] = 1.0
        self.order = torch.argsort(h.diagonal(), descending=True) if act_order else diag
        h = h[self.order][:, self.order]
        self.upper = _inverse_cholesky_upper(h)

    def round(self, weight: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        """Integer codes (N, K) in [qmin, qmax] for ``weight`` (N, K) on the grid ``step`` (N, K)."""
        w = weight.float()[:, self.order].clone()
        step = step.float()[:, self.order]
        u = self.upper
        codes = torch.empty_like(w)
        k = w.shape[1]
        for start in range(0, k, BLOCK):
            end = min(start + BLOCK, k)
            block = w[:, start:end].clone()
            errors = torch.empty_like(block)
            for j in range(end - start):
                col = start + j
                q = torch.clamp(torch.round(block[:, j] / step[:, col]), qmin, qmax)
                codes[:, col] = q
                err = (block[:, j] - q * step[:, col]) / u[col, col]
                block[:, j:] -= err.unsqueeze(1) * u[col, col:end].unsqueeze(0)
                errors[:, j] = err
            w[:, end:] -= errors @ u[start:end, end:]
        result = torch.empty_like(codes)
        result[:, self.order] = codes
        return result.to(torch.int32)


def _inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping)^-1, the quantity the column updates use."""
    h = h.clone()
    diag = torch.arange(h.shape[0])
    h[diag, diag] += DAMPING * float(h.diagonal().mean().clamp_min(1e-12))
    for attempt in range(5):  # raise damping if a nearly singular H still fails
        factor, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            break
        h[diag, diag] += DAMPING * float(h.diagonal().mean()) * 10 ** attempt
    else:
        raise RuntimeError("input Gram matrix is not positive definite even with damping")
    return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)


def round_with_error_feedback(weight: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int,
                              hessian: torch.Tensor, act_order: bool = True) -> torch.Tensor:
    """One-shot form of :class:`ErrorFeedbackRounder`."""
    return ErrorFeedbackRounder(hessian, act_order).round(weight, step, qmin, qmax)


def output_error_per_channel(diff: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per output channel ``d H d^T``: the mean squared output error a weight error ``diff`` (N, K) causes."""
    d = diff.float()
    return ((d @ hessian.float()) * d).sum(1)
