"""The seeded per-row draw (trl_opd.trainers.rows) behind teacher-aligned prompts (methods.md §7.3) and EDGE-OPD
guided rollouts (§5.2): a function of (seed, step, global row, stream) only, one independent stream per use."""

from functools import partial

import numpy as np
import pytest

from trl_opd.trainers.rows import ALIGNED_STREAM, GUIDED_STREAM, seeded_rows

aligned_rows = partial(seeded_rows, stream=ALIGNED_STREAM)  # OPDTrainer._align_prompts' draw
guided_rows = partial(seeded_rows, stream=GUIDED_STREAM)  # OPDTrainer._draw_guided_rows' draw


def test_aligned_rows_is_a_function_of_seed_step_and_global_row():
    whole = aligned_rows(0.3, seed=7, step=5, first_row=0, num_rows=12)
    # Two processes holding 6 rows each draw exactly the whole batch's decisions.
    assert aligned_rows(0.3, seed=7, step=5, first_row=0, num_rows=6) + aligned_rows(
        0.3, seed=7, step=5, first_row=6, num_rows=6) == whole
    assert aligned_rows(0.3, seed=7, step=5, first_row=0, num_rows=12) == whole  # no hidden RNG state
    assert aligned_rows(0.3, seed=7, step=6, first_row=0, num_rows=400) != aligned_rows(
        0.3, seed=7, step=5, first_row=0, num_rows=400)
    assert aligned_rows(0.3, seed=8, step=5, first_row=0, num_rows=400) != aligned_rows(
        0.3, seed=7, step=5, first_row=0, num_rows=400)
    # The formula: row r is aligned iff its uniform draw from (seed, step, r, salt) is below the ratio.
    expected = [np.random.default_rng([7, 5, row, ALIGNED_STREAM]).random() < 0.3 for row in range(12)]
    assert whole == expected


def test_aligned_rows_share_and_extremes_and_independence_from_guided_rows():
    draws = np.array(aligned_rows(0.3, seed=0, step=3, first_row=0, num_rows=20_000))
    assert draws.mean() == pytest.approx(0.3, abs=0.015)  # ±4.6 standard errors
    assert aligned_rows(0.0, seed=0, step=0, first_row=0, num_rows=5) == [False] * 5
    assert aligned_rows(1.0, seed=0, step=0, first_row=0, num_rows=5) == [True] * 5
    guided = np.array(guided_rows(0.3, seed=0, step=3, first_row=0, num_rows=20_000))
    both = (draws & guided).mean()
    assert both == pytest.approx(0.09, abs=0.01)  # independent draws: 0.3 × 0.3, not 0.3


def test_guided_rows_depend_only_on_seed_step_and_global_row():
    whole = guided_rows(0.3, seed=7, step=5, first_row=0, num_rows=8)
    split = guided_rows(0.3, seed=7, step=5, first_row=0, num_rows=4) + guided_rows(0.3, seed=7, step=5,
                                                                                    first_row=4, num_rows=4)
    assert whole == split  # the same rows are guided whatever the number of processes
    many = guided_rows(0.3, seed=7, step=5, first_row=0, num_rows=4000)
    assert abs(np.mean(many) - 0.3) < 0.03
    assert many != guided_rows(0.3, seed=7, step=6, first_row=0, num_rows=4000)
    assert not any(guided_rows(0.0, seed=7, step=5, first_row=0, num_rows=50))
    # The formula (no salt: the draws EDGE-OPD runs made before the aligned stream existed).
    assert whole == [np.random.default_rng([7, 5, row]).random() < 0.3 for row in range(8)]
    assert seeded_rows(0.3, seed=7, step=5, first_row=0, num_rows=8) == whole  # the default stream
