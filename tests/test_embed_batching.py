import numpy as np
import pytest

from pipeline.embed.batching import check_permutation, plan_batches, plan_packs, restore_order


def random_lengths(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 300))
    # A realistic skew: mostly short rows, a long tail, some longer than the budget.
    return np.minimum(rng.lognormal(5.0, 1.0, n).astype(np.int64), 20_000)


@pytest.mark.parametrize("seed", range(25))
def test_plan_batches_respects_budget_and_is_a_permutation(seed):
    lengths = random_lengths(seed)
    budget = int(np.random.default_rng(seed + 1000).choice([64, 512, 4096, 16384]))
    max_rows = [None, 1, 7][seed % 3]
    batches = plan_batches(lengths, budget, max_rows=max_rows)
    check_permutation(batches, len(lengths))
    assert sum(len(b) for b in batches) == len(lengths)
    for b in batches:
        longest = max(int(lengths[b].max()), 1)
        if len(b) > 1:
            assert len(b) * longest <= budget
        else:
            assert len(b) == 1
        if max_rows is not None:
            assert len(b) <= max_rows
    # Greedy: a batch could not have taken the next row without breaking the budget/row cap.
    order = np.concatenate(batches) if batches else np.zeros(0, int)
    assert (np.diff(lengths[order]) <= 0).all(), "rows are planned longest first"
    for b in batches[:-1]:
        longest = max(int(lengths[b].max()), 1)
        cap = budget // longest if max_rows is None else min(budget // longest, max_rows)
        assert len(b) == max(cap, 1)


@pytest.mark.parametrize("seed", range(10))
def test_restore_order_puts_every_row_back(seed):
    lengths = random_lengths(seed)
    batches = plan_batches(lengths, 2048)
    # Per-batch outputs computed from the row's own identity, as the engine computes them.
    outputs = [np.stack([lengths[b] * 10, b], axis=1) for b in batches]
    restored = restore_order(batches, outputs, len(lengths)) if len(lengths) else np.zeros((0, 2), int)
    assert np.array_equal(restored[:, 1], np.arange(len(lengths)))
    assert np.array_equal(restored[:, 0], lengths * 10)


@pytest.mark.parametrize("seed", range(10))
def test_plan_packs_holds_budget_of_real_tokens(seed):
    lengths = random_lengths(seed)
    packs = plan_packs(lengths, 4096)
    check_permutation(packs, len(lengths))
    for p in packs:
        assert len(p) == 1 or np.maximum(lengths[p], 1).sum() <= 4096
    for p, nxt in zip(packs, packs[1:]):
        # Greedy: the next pack's first row would not have fitted.
        assert np.maximum(lengths[p], 1).sum() + max(int(lengths[nxt[0]]), 1) > 4096


def test_single_long_row_goes_alone():
    batches = plan_batches([10, 5000, 10, 10], token_budget=100)
    assert [b.tolist() for b in batches] == [[1], [0, 2, 3]]


def test_check_permutation_catches_lost_and_duplicated_rows():
    check_permutation([np.array([2, 0]), np.array([1])], 3)
    with pytest.raises(AssertionError, match="lost \\[1\\]"):
        check_permutation([np.array([2, 0])], 3)
    with pytest.raises(AssertionError, match="duplicated \\[0\\]"):
        check_permutation([np.array([2, 0]), np.array([0])], 3)
    with pytest.raises(AssertionError):
        restore_order([np.array([0, 1])], [np.zeros((1, 4))], 2)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        plan_batches([1, 2], 0)
    with pytest.raises(ValueError):
        plan_batches([1, -2], 10)
    with pytest.raises(ValueError):
        plan_batches([1, 2], 10, max_rows=0)
