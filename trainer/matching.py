"""The one bipartite matching of the paper, used twice: the loss's matched ground truth (Sec. 3.4) and
the Matching IoU metric (evaluation), so that "matched" means the same in training and in scoring."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["matched_pairs"]


def matched_pairs(weight: np.ndarray) -> list[tuple[int, int]]:
    """The maximum-weight one-to-one (row, column) pairs of a (rows, columns) weight matrix, keeping those
    of weight > 0: a pair that shares nothing is no match."""
    rows, cols = linear_sum_assignment(weight, maximize=True)
    return [(int(r), int(c)) for r, c in zip(rows, cols) if weight[r, c] > 0]
