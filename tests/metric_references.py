"""Brute-force references for the metrics tests: textbook definitions, pair by pair."""

import math
from itertools import combinations


def brute_tau_b(x, y):
    """Textbook tau-b by explicit pair classification."""
    c = d = only_x = only_y = 0
    for i, j in combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            only_x += 1
        elif dy == 0:
            only_y += 1
        elif dx * dy > 0:
            c += 1
        else:
            d += 1
    denom = math.sqrt((c + d + only_x) * (c + d + only_y))
    return (c - d) / denom if denom else float("nan")
