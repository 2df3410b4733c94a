"""Input Gram matrices ``H = X^T X`` accumulated while the sampler runs, for error-compensated rounding.

Why not keep input rows and build H at fit time: a full-size UNet layer needs at least K independent
rows for a full-rank H (K up to 23040 for SD1.5's 3x3 convs), far more than a row reservoir holds; H
itself is a fixed K x K sum however many tokens it has seen.

Two bounds make this affordable at full size (docs/CALIBRATION_MEMORY.md has the figures):

- **Block-diagonal H.** K is split into blocks of at most ``block`` columns (whole input channels for
  convs: a block never splits one channel's kernel taps) and only the diagonal blocks are kept. Memory
  and fit cost drop from K^2 to K x block; the rounding compensates errors within a block. For SD1.5
  the sum of full H over all layers is 26 GiB in float32; block-diagonal at 1024 columns it is 2.4 GiB.
- **Row subsampling per call.** Accumulating every token would cost ``K / N`` times the layer's own
  GEMM (9x for a 3x3 conv with as many outputs as input channels). Each call adds a seeded uniform
  subset of its rows, sized so the update costs about ``cost`` times the layer's own FLOPs (all rows
  when that covers them). Every call contributes, so every timestep and prompt is represented.

Accumulation is float32 on the input's device (the GPU when the model is there).
"""
from __future__ import annotations

import math

import torch

MIN_ROWS_PER_CALL = 64  # below this the subset is all rows (small deep layers see few tokens per call)
FLUSH_ROWS = 64         # rows buffered before an update: with fewer, re-reading every H block per call
                        # (2.4 GiB for SD1.5) would cost more than the arithmetic


def block_bounds(reduce_dim: int, block: int, align: int = 1) -> list[tuple[int, int]]:
    """Near-equal column blocks of at most ``block`` columns, each a multiple of ``align``."""
    units = reduce_dim // align
    per_block = max(1, block // align)
    count = math.ceil(units / per_block)
    edges = [round(i * units / count) * align for i in range(count + 1)]
    return [(edges[i], edges[i + 1]) for i in range(count)]


def gram_bytes(reduce_dim: int, block: int, align: int = 1) -> int:
    return sum((end - start) ** 2 * 4 for start, end in block_bounds(reduce_dim, block, align))


def rows_per_call(n_rows: int, reduce_dim: int, out_features: int, block: int, cost: float) -> int:
    """Rows to add from a call with ``n_rows`` rows so the Gram update costs ~``cost`` x the layer's GEMM."""
    widest = min(reduce_dim, block)
    budget = math.ceil(cost * n_rows * out_features / widest)
    return min(n_rows, max(MIN_ROWS_PER_CALL, budget))


class GramAccumulator:
    """Block-diagonal ``sum x^T x`` over added rows; ``blocks()`` gives the mean ``H_b = X_b^T X_b / n``."""

    def __init__(self, reduce_dim: int, block: int, align: int = 1) -> None:
        self.reduce_dim = reduce_dim
        self.bounds = block_bounds(reduce_dim, block, align)
        self.sums: list[torch.Tensor] | None = None  # allocated on the first rows' device
        self.pending: list[torch.Tensor] = []        # rows not yet added to the sums
        self.pending_rows = 0
        self.rows = 0
        self.normalized = False  # blocks() turned the sums into means (no rows may be added after)

    @property
    def widest(self) -> int:
        return max(end - start for start, end in self.bounds)

    def add(self, rows: torch.Tensor) -> None:
        """Add rows (n, K) of any float dtype; accumulates in float32 once ``FLUSH_ROWS`` are pending."""
        if self.normalized:
            raise RuntimeError("rows added after blocks() was read")
        x = rows.float()
        self.rows += x.shape[0]
        self.pending_rows += x.shape[0]
        if self.pending_rows < FLUSH_ROWS:
            x = x.clone() if x.data_ptr() == rows.data_ptr() else x  # may be a view of the layer's input
        self.pending.append(x)
        if self.pending_rows >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        x = torch.cat(self.pending) if len(self.pending) > 1 else self.pending[0]
        self.pending, self.pending_rows = [], 0
        if self.sums is None:
            # Normal tensors even when the host samples under torch.inference_mode() (Forge): blocks()
            # divides them in place later, outside it, which inference tensors refuse.
            with torch.inference_mode(False):
                self.sums = [torch.zeros(e - s, e - s, device=x.device) for s, e in self.bounds]
        for (start, end), acc in zip(self.bounds, self.sums):
            part = x[:, start:end]
            acc.addmm_(part.t(), part)

    def blocks(self) -> list[tuple[slice, torch.Tensor]]:
        """(column slice, mean Gram block on the CPU) per block; empty when no row was added."""
        self.flush()
        if self.sums is None or self.rows == 0:
            return []
        if not self.normalized:  # sums -> means in place: no second copy of the largest tensors we hold
            for acc in self.sums:
                acc.div_(self.rows)
            self.normalized = True
        return [(slice(s, e), acc.cpu()) for (s, e), acc in zip(self.bounds, self.sums)]

    def nbytes(self) -> int:
        return sum((e - s) ** 2 * 4 for s, e in self.bounds)


def plan_passes(sizes: dict, budget_bytes: int) -> list[list[str]]:
    """Split layers (name -> Gram bytes, in model order) into capture passes of at most ``budget_bytes``.

    Greedy in model order; a layer larger than the budget gets a pass of its own (it cannot be split).
    At least one pass, possibly empty (no layer needs a Gram matrix).
    """
    passes: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if passes[-1] and used + size > budget_bytes:
            passes.append([])
            used = 0
        passes[-1].append(name)
        used += size
    return passes


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device`` (CUDA: the driver's free memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None  # unknown (not Linux): the configured budget alone applies


def budget_bytes(limit_mb: int, device: torch.device, share: float = 0.5) -> int:
    """The Gram budget: the configured limit, and at most ``share`` of what the device has free now."""
    limit = limit_mb * 2**20
    free = available_bytes(device)
    return limit if free is None else min(limit, int(free * share))
