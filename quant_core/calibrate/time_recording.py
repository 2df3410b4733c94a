"""Time information precalculation, calibration side: record the time path's float outputs per timestep.

Forward hooks on the model's own time modules keep the first output row seen for each timestep during
the capture pass; ``tables()`` turns them into the float tables that ``runtime/timetables.py`` looks up.
"""
from __future__ import annotations

import torch


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
