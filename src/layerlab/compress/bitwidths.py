"""Bit-widths per block under a budget: the exact integer program over measured costs (:func:`allocate`), and the
ranking that fills the budget for an importance score (:func:`ranked_cost`, ``fill``). Pure Python and numpy,
on layer sizes and costs only; :mod:`layerlab.compress.quantize` measures the costs and writes the result."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from ..errors import LayerlabError

MAX_STATES = 4_000_000  # ``fill``'s knapsack table cells; beyond this, layer sizes are rounded to coarser units


def budget_units(sizes: list[int], bits: float) -> tuple[list[int], int]:
    """The layer sizes in units of their greatest common divisor (equal-sized blocks are one unit each), and
    the budget in bit-units: the largest integer at most ``bits`` x the total units."""
    unit = math.gcd(*sizes)
    units = [s // unit for s in sizes]
    return units, _floor_bits(bits, sum(units))


def _floor_bits(bits: float, units: int) -> int:
    """floor(bits x units), with ``bits`` read as the nearest fraction of denominator at most a million, so
    that 3.3 or 8/3 given as floats count as exactly those (3.3 x 10 is 33, not 32 by float rounding)."""
    return math.floor(Fraction(bits).limit_denominator(1_000_000) * units)


def allocate(sizes: list[int], bits: float, widths: tuple[int, ...], cost: list[dict[int, float]],
             fill: bool = False) -> list[int]:
    """One width per layer; widths missing from a layer's ``cost`` are not allowed for it.

    By default Hubara et al.'s integer program (2021, Improving Post Training Neural Quantization): minimise
    the summed ``cost[layer][width]`` subject to the size-weighted average width being at most ``bits``. Where
    a lower width costs less (a measured loss delta can be negative), the optimum uses less than the
    budget; among assignments of equal cost the smallest is taken. Exact at any layer sizes: a dynamic
    program over the layers that keeps, of all partial assignments, only those no other beats in both size
    and cost (the Pareto front of a multiple-choice knapsack), so no table over the budget is built; at
    most one entry per reachable size in units of the sizes' greatest common divisor (for 80 equal blocks
    and widths up to 8, at most 641: milliseconds), often far fewer. Only blocks of many unrelated sizes
    whose costs are all nearly proportional to their sizes make the front large (80 random sizes, costs
    size x (8 - width) within 0.1%: about a minute; random loss-like deltas on the same sizes: 0.1 s).

    With ``fill`` (LWQ's rule, for rank-based costs): the largest average at most ``bits`` first (exactly
    ``bits`` where some assignment reaches it), and the least cost among those; a knapsack table over the
    budget, exact while it has at most :data:`MAX_STATES` cells (equal-sized blocks always do), beyond which
    sizes are rounded to coarser units.
    """
    if not sizes:
        return []
    return (_fill_budget if fill else _least_cost)(sizes, bits, widths, cost)


def _no_assignment(bits: float, widths: tuple[int, ...]) -> LayerlabError:
    return LayerlabError(f"no assignment of widths {list(widths)} reaches an average of at most {bits} bits")


def _least_cost(sizes: list[int], bits: float, widths: tuple[int, ...], cost: list[dict[int, float]]) -> list[int]:
    """:func:`allocate`'s integer program: the Pareto front of (size, cost) over the layers so far."""
    units, budget = budget_units(sizes, bits)
    size, total = np.zeros(1, dtype=np.int64), np.zeros(1)  # the front: size strictly up, cost strictly down
    steps = []  # per layer, for each front entry: (the entry it extends, the width it gives the layer)
    for u, c in zip(units, cost, strict=True):
        allowed = [w for w in widths if w in c]
        s = np.concatenate([size + u * w for w in allowed])
        t = np.concatenate([total + c[w] for w in allowed])
        parent = np.tile(np.arange(len(size)), len(allowed))
        width = np.repeat(np.array(allowed, dtype=np.int64), len(size))
        ok = s <= budget
        s, t, parent, width = s[ok], t[ok], parent[ok], width[ok]
        if not len(s):
            raise _no_assignment(bits, widths)
        order = np.lexsort((t, s))  # by size, then cost
        s, t, parent, width = s[order], t[order], parent[order], width[order]
        keep = np.ones(len(t), dtype=bool)
        keep[1:] = t[1:] < np.minimum.accumulate(t)[:-1]  # strictly cheaper than every smaller entry
        size, total = s[keep], t[keep]
        steps.append((parent[keep], width[keep]))
    j = len(size) - 1  # the cheapest entry (and, of equal cost, the smallest)
    out = []
    for parent, width in reversed(steps):
        out.append(int(width[j]))
        j = int(parent[j])
    return out[::-1]


def _fill_budget(sizes: list[int], bits: float, widths: tuple[int, ...], cost: list[dict[int, float]]) -> list[int]:
    """:func:`allocate` with ``fill``: least cost for each exact total, then the largest total in the budget."""
    units, budget = budget_units(sizes, bits)
    if (budget + 1) * len(sizes) > MAX_STATES:  # very unequal layers: coarser units, slightly inexact budget
        scale = (budget + 1) * len(sizes) / MAX_STATES
        units = [max(1, round(u / scale)) for u in units]
        budget = _floor_bits(bits, sum(units))
    inf = float("inf")
    best = [0.0] + [inf] * budget  # best[s]: least cost of the layers so far with exactly s bit-units
    choice: list[list[int]] = []
    for u, c in zip(units, cost, strict=True):
        new = [inf] * (budget + 1)
        pick = [0] * (budget + 1)
        for s, prev in enumerate(best):
            if prev == inf:
                continue
            for w in widths:
                if w not in c:
                    continue
                t = s + u * w
                if t <= budget and prev + c[w] < new[t]:
                    new[t], pick[t] = prev + c[w], w
        best = new
        choice.append(pick)
    reachable = [s for s in range(budget, -1, -1) if best[s] < inf]
    if not reachable:
        raise _no_assignment(bits, widths)
    s = reachable[0]
    out = []
    for u, pick in zip(reversed(units), reversed(choice), strict=True):
        out.append(pick[s])
        s -= u * pick[s]
    return out[::-1]


def bracket(bits: float, widths: tuple[int, ...]) -> tuple[int, int]:
    """The candidate widths just below and just above ``bits``."""
    return max(w for w in widths if w <= bits + 1e-9), min(w for w in widths if w >= bits - 1e-9)


def ranked_cost(importance: list[float], bits: float, widths: tuple[int, ...]) -> list[dict[int, float]]:
    """LWQ's rule as a knapsack cost: only the two widths around ``bits``; leaving a block at the
    lower one costs its importance, so the most important blocks get the higher width."""
    lo, hi = bracket(bits, widths)
    if lo == hi:
        return [{lo: 0.0} for _ in importance]
    m = min(importance)
    return [{lo: imp - m + 1e-9, hi: 0.0} for imp in importance]


def average_bits(sizes: list[int], alloc: list[int]) -> float:
    return sum(s * b for s, b in zip(sizes, alloc, strict=True)) / sum(sizes)
