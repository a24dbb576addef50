"""The seeded per-row draw behind OPDTrainer's row-level choices: which rows get a teacher-aligned prompt
(methods.md §7.3) and which an EDGE-OPD guided rollout (§5.2).

Pure Python (no trainer state). Each decision is a function of (seed, step, global row index, stream) only, so every
process agrees, and the result depends neither on the process layout, nor on the global RNG state, nor on earlier
draws. Different streams give independent draws for the same row.
"""

from __future__ import annotations

import numpy as np

#: EDGE-OPD guided rollouts: the draw's entropy is (seed, step, row), no salt.
GUIDED_STREAM = None
#: Teacher-aligned prompts: the salt keeps the draw independent of the guided one.
ALIGNED_STREAM = 0x616C6E


def seeded_rows(
    share: float, *, seed: int, step: int, first_row: int, num_rows: int, stream: int | None = GUIDED_STREAM
) -> list[bool]:
    """Row r is chosen with probability ``share``: its uniform draw from ``(seed, step, r[, stream])`` is below it.

    ``first_row`` is the global index of the first of the ``num_rows`` local rows (process index × local batch
    size). ``share`` 0 (or less) chooses no row, 1 (or more) every row.
    """
    if share <= 0.0:
        return [False] * num_rows
    if share >= 1.0:
        return [True] * num_rows
    salt = [] if stream is None else [stream]
    return [
        bool(np.random.default_rng([seed, step, first_row + row, *salt]).random() < share) for row in range(num_rows)
    ]
