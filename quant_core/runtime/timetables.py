"""Time information precalculation: the time path's outputs as float tables indexed by timestep.

The time-embedding MLP and (when the embedding depends on t alone, i.e. not SDXL) every ResBlock
time projection compute the same output for the same t on every call. Their outputs are recorded
in float during the calibration capture, by hooks on the model's own modules, so a lookup returns
exactly what the float computation would (``calibrate/time_recording.py``). At run time the model's
runtime resolves the call's timesteps to table rows once (``StepContext.time_rows``); a timestep never
seen falls back to the float module.

Weight patches (LoRA) on the time path. A lookup keeps the float module's state-dict keys (its
children and parameters are registered under their own names, e.g. ``time_embed.0.weight``), so
ComfyUI finds and patches them like on the float model. Whenever the weights may have changed
(``StepContext.weights_epoch`` moves, once per load) the first call with known timesteps computes
the float module and compares it with the table; if they differ (patched weights, or a patched
input such as a LoRA'd time MLP feeding a ResBlock projection) the lookup runs the float module
until the next change. After that first call the only per-call cost is one integer comparison.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.func import functional_call

MATCH_TOLERANCE = 1e-3  # timesteps are keyed to 3 decimals (capture.timestep_key)
# Table vs float module on the same call, relative L2: above this the table is not used. Same weights
# give 0 on the same device and dtype (measured in tests/test_lora_layers.py); float16/bfloat16 leave
# room for recomputation on another device.
TABLE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4}
HALF_TABLE_TOLERANCE = 5e-3


def resolve_rows(time_keys: torch.Tensor | None, timesteps: torch.Tensor) -> torch.Tensor | None:
    """Row index of each timestep in the tables, or None if any timestep is not in them."""
    if time_keys is None or time_keys.numel() == 0:
        return None
    t = timesteps.detach().float().reshape(-1).cpu().contiguous()
    idx = torch.searchsorted(time_keys, t).clamp_(max=time_keys.numel() - 1)
    below = (idx - 1).clamp_(min=0)
    nearer = torch.where((time_keys[below] - t).abs() < (time_keys[idx] - t).abs(), below, idx)
    if bool(((time_keys[nearer] - t).abs() > MATCH_TOLERANCE).any()):
        return None
    return nearer


class TimeTableLookup(nn.Module):
    """Stands in for a time-path module: table rows for known timesteps, the float module otherwise.

    Key-preserving: the wrapped module's children, parameters and buffers are registered here under
    their own names (the same objects), so ``state_dict()`` keys match the float model's and weight
    patches reach the wrapped module. The table itself is the extra buffer ``time_table``.
    """

    def __init__(self, module: nn.Module, table: torch.Tensor, context) -> None:
        super().__init__()
        object.__setattr__(self, "module", module)  # not registered: no extra key level
        for name, child in module.named_children():
            self.add_module(name, child)
        for name, param in module.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in module.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=name not in module._non_persistent_buffers_set)
        self.register_buffer("time_table", table.float())
        self.context = context
        self.table_verified = None  # None: not checked for the current weights epoch; else True/False
        self._epoch = None

    @property
    def table(self) -> torch.Tensor:
        return self.time_table

    def float_forward(self, x, *args, **kwargs):
        """The wrapped float module, with any of its own tensors that were replaced here (set_attr_param)."""
        own = {name: t for name, t in list(self._parameters.items()) + list(self._buffers.items())
               if name != "time_table" and t is not None}
        originals = dict(self.module._parameters, **self.module._buffers)
        if all(originals.get(name) is t for name, t in own.items()):
            return self.module(x, *args, **kwargs)
        return functional_call(self.module, own, (x, *args), kwargs, strict=False)

    def _rows(self, rows, x):
        out = self.time_table[rows.to(self.time_table.device)]
        if out.shape[0] != x.shape[0]:
            out = out.expand(x.shape[0], -1)
        return out.to(device=x.device, dtype=x.dtype)

    def forward(self, x, *args, **kwargs):
        rows = self.context.time_rows
        # diffusers passes timestep_cond=None positionally; only a real extra input changes the output.
        extra = any(a is not None for a in args) or any(v is not None for v in kwargs.values())
        if rows is None or extra or rows.numel() not in (1, x.shape[0]):
            return self.float_forward(x, *args, **kwargs)
        if self._epoch != self.context.weights_epoch:
            # First call with known timesteps since the weights may have changed: verify once.
            out = self.float_forward(x)
            table_out = self._rows(rows, x)
            tol = TABLE_TOLERANCE.get(out.dtype, HALF_TABLE_TOLERANCE)
            diff = (table_out.float() - out.float()).norm() / out.float().norm().clamp_min(1e-12)
            self.table_verified = bool(diff <= tol)
            self.table_error = float(diff)
            self._epoch = self.context.weights_epoch
            return out
        if not self.table_verified:
            return self.float_forward(x)
        return self._rows(rows, x)

    def extra_repr(self) -> str:
        state = {None: "unverified", True: "table", False: "float (weights or input changed)"}[self.table_verified]
        return f"time table {tuple(self.time_table.shape)}, {state}"
