"""Mixed precision: spend an average-weight-bits budget where measured sensitivity is highest.

Every layer starts at the base precision (W4). Upgrades (W4 -> W8, W8 -> float) are taken greedily
by error removed per extra bit, until the next one would exceed the budget. Sensitivity is the
layer's relative output error at each precision, measured on its captured rows.
"""
from __future__ import annotations

FLOAT_BITS = 16


def plan_precision(sizes: dict, errors: dict, base_bits: int, budget: float) -> dict:
    """``sizes``: {name: weight count}; ``errors``: {name: {bits: relative error}}.

    Returns {name: bits} with bits in {base_bits, 8, 16}; the average (weighted by size) stays <= budget.
    """
    plan = {name: base_bits for name in sizes}
    total = sum(sizes.values())
    used = base_bits * total
    limit = budget * total
    ladder = [b for b in (4, 8, FLOAT_BITS) if b >= base_bits]

    def next_step(name):
        current = plan[name]
        higher = [b for b in ladder if b > current]
        if not higher:
            return None
        target = higher[0]
        gain = errors[name].get(current, 0.0) - (0.0 if target == FLOAT_BITS else errors[name].get(target, 0.0))
        cost = (target - current) * sizes[name]
        return gain / cost, target, cost

    while True:
        options = []
        for name in plan:
            step = next_step(name)
            if step is not None and step[0] > 0 and used + step[2] <= limit:
                options.append((step[0], name, step[1], step[2]))
        if not options:
            return plan
        _, name, target, cost = max(options, key=lambda o: (o[0], o[1]))
        plan[name] = target
        used += cost


def average_bits(plan: dict, sizes: dict) -> float:
    total = sum(sizes.values())
    return sum(plan[n] * sizes[n] for n in plan) / total if total else 0.0


def plan_random(sizes: dict, base_bits: int, budget: float, seed: int) -> dict:
    """The ablation of :func:`plan_precision`: the same budget spent on W8 upgrades of random layers."""
    import random

    plan = {name: base_bits for name in sizes}
    limit, used = budget * sum(sizes.values()), base_bits * sum(sizes.values())
    names = sorted(sizes)
    random.Random(seed).shuffle(names)
    for name in names:
        cost = (8 - base_bits) * sizes[name]
        if used + cost <= limit:
            plan[name], used = 8, used + cost
    return plan
