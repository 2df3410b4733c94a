"""Time information precalculation: the time path's outputs as float tables indexed by timestep.

The time-embedding MLP and (when the embedding depends on t alone, i.e. not SDXL) every ResBlock
time projection compute the same output for the same t on every call. Their outputs are recorded
in float during the calibration capture, by hooks on the model's own modules, so a lookup returns
exactly what the float computation would. At run time the model-level wrapper resolves the call's
timesteps to table rows once (``StepContext.time_rows``); a timestep never seen falls back to the
float module.
"""
from __future__ import annotations

import torch
import torch.nn as nn

MATCH_TOLERANCE = 1e-3  # timesteps are keyed to 3 decimals (capture.timestep_key)


class TimeOutputRecorder:
    """Forward hooks that keep the first output row seen for each (module, timestep)."""

    def __init__(self, modules: dict, current_timesteps) -> None:
        self.modules = modules
        self.current_timesteps = current_timesteps  # callable -> (B,) tensor of rounded keys or None
        self.outputs: dict = {name: {} for name in modules}
        self.handles: list = []

    def __enter__(self):
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _hook(self, name):
        def hook(module, args, output):
            keys = self.current_timesteps()
            if keys is None or not isinstance(output, torch.Tensor):
                return None
            rows = output.detach().reshape(output.shape[0], -1)
            if keys.numel() == 1:
                keys = keys.expand(rows.shape[0])
            if keys.numel() != rows.shape[0]:
                return None  # batch layout we cannot attribute to timesteps: skip, fall back at run time
            table = self.outputs[name]
            for i, key in enumerate(keys.tolist()):
                if key not in table:
                    table[key] = rows[i].float().cpu()
            return None
        return hook

    def tables(self) -> tuple[torch.Tensor | None, dict]:
        """(sorted timestep keys (T,), {name: (T, D) float32}) over timesteps every module recorded."""
        common = None
        for table in self.outputs.values():
            common = set(table) if common is None else common & set(table)
        if not common:
            return None, {}
        keys = sorted(common)
        return (torch.tensor(keys, dtype=torch.float32),
                {name: torch.stack([table[k] for k in keys]) for name, table in self.outputs.items()})


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
    """Stands in for a time-path module: table rows for known timesteps, the float module otherwise."""

    def __init__(self, module: nn.Module, table: torch.Tensor, context) -> None:
        super().__init__()
        self.module = module
        self.register_buffer("table", table.float())
        self.context = context

    def forward(self, x, *args, **kwargs):
        rows = self.context.time_rows
        # diffusers passes timestep_cond=None positionally; only a real extra input changes the output.
        extra = any(a is not None for a in args) or any(v is not None for v in kwargs.values())
        if rows is None or extra:
            return self.module(x, *args, **kwargs)
        batch = x.shape[0]
        if rows.numel() not in (1, batch):
            return self.module(x)
        out = self.table[rows.to(self.table.device)]
        if out.shape[0] != batch:
            out = out.expand(batch, -1)
        return out.to(device=x.device, dtype=x.dtype)
