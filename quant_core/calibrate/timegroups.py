"""Multi-timestep activation quantization: split the sampled timesteps into G contiguous groups.

Activation ranges drift with t (early, noisy steps see larger activations in many layers). Each
group gets its own static scales. Boundaries come from the captured per-step ranges: dynamic
programming over the timesteps (sorted by t) minimises, summed over layers and steps, the bits
wasted when a step uses its group's maximum range instead of its own: log2(group_max / step_max).
"""
from __future__ import annotations

import math

import torch


def plan_groups(timesteps: list, ranges: torch.Tensor, groups: int) -> list:
    """Split ``timesteps`` (sorted descending) into at most ``groups`` contiguous runs.

    ``ranges``: (layers, steps) per-step absolute maxima aligned with ``timesteps``.
    Returns a list of lists of timestep keys, in the same (descending) order.
    """
    steps = len(timesteps)
    groups = max(1, min(groups, steps))
    if groups == 1:
        return [list(timesteps)]
    logr = torch.log2(ranges.double().clamp_min(1e-12))  # (L, S)
    # cost[i][j]: wasted bits if steps i..j (inclusive) share one scale.
    cost = [[0.0] * steps for _ in range(steps)]
    for i in range(steps):
        running = logr[:, i].clone()
        total = logr[:, i].clone()
        for j in range(i, steps):
            if j > i:
                running = torch.maximum(running, logr[:, j])
                total += logr[:, j]
            cost[i][j] = float((running * (j - i + 1) - total).sum())
    best = [[math.inf] * (steps + 1) for _ in range(groups + 1)]
    cut = [[0] * (steps + 1) for _ in range(groups + 1)]
    best[0][0] = 0.0
    for g in range(1, groups + 1):
        for end in range(1, steps + 1):
            for start in range(g - 1, end):
                value = best[g - 1][start] + cost[start][end - 1]
                if value < best[g][end]:
                    best[g][end], cut[g][end] = value, start
    # Fewer groups if more would not help (identical ranges): take the best count <= groups.
    g = min(range(1, groups + 1), key=lambda k: (round(best[k][steps], 9), k))
    bounds, end = [], steps
    while g > 0:
        start = cut[g][end]
        bounds.append((start, end))
        end, g = start, g - 1
    return [list(timesteps[s:e]) for s, e in reversed(bounds)]
