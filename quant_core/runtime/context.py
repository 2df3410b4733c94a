"""The state of the current UNet call that every quantized layer of one model reads."""
from __future__ import annotations

import torch


class StepContext:
    """Set once per UNet call by the model's runtime (:class:`quant_core.runtime.model.QuantizedModel`).

    ``step_group``: which timestep group's activation scales are live.
    ``timesteps``: the call's timesteps (model-time t, shape (B,)).
    ``time_rows``: row of each timestep in the precalculated time tables, or None when any
    timestep of the call was not seen in calibration (then the time path is computed in float).
    ``weights_epoch``: bumped whenever the weights may have changed (e.g. a host merged a LoRA);
    time lookups re-verify their tables and host glue re-checks restored weights once per epoch.
    Comparing this int is the only per-call cost.
    ``group_index``: ``step_group`` as a 0-d int64 tensor, updated in place, for compiled layers: a
    compiled graph reads it as an input, so a new group needs no recompile (an int would be specialized).
    """

    def __init__(self) -> None:
        self.group_index = torch.zeros((), dtype=torch.int64)
        self._group = 0
        self.timesteps: torch.Tensor | None = None
        self.time_rows: torch.Tensor | None = None
        self.weights_epoch = 0

    @property
    def step_group(self) -> int:
        return self._group

    @step_group.setter
    def step_group(self, group: int) -> None:
        if group != self._group:
            self._group = group
            self.group_index.fill_(group)


def tensor_version(tensor: torch.Tensor) -> int:
    """The tensor's in-place version counter, or -1 for an inference tensor (made under
    ``torch.inference_mode()``, as ComfyUI's server patches LoRA weights), which has none; the
    identity and checksum checks next to every use still catch a replaced or rewritten tensor."""
    return -1 if tensor.is_inference() else tensor._version


def group_thresholds(step_groups: list) -> list:
    """Midpoints between neighbouring timestep groups' t ranges, descending; t above the first is group 0."""
    return [(min(a) + max(b)) / 2 for a, b in zip(step_groups[:-1], step_groups[1:])]


def group_of(t: float, thresholds: list) -> int:
    """Timestep group for any timestep, seen or not: the group whose t range is nearest."""
    for index, threshold in enumerate(thresholds):
        if t > threshold:
            return index
    return len(thresholds)
