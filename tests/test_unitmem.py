"""UnitMem against hand-computed values and an independent float64 numpy computation."""

import numpy as np
import pytest
import torch

from pytest_memaudit.errors import AuditError
from pytest_memaudit.unitmem import UnitMemAccumulator, median_matrix_bytes


def run(matrix, reduce="mean", batches=(None,), topk=3, **kwargs):
    matrix = np.asarray(matrix, dtype=np.float32)
    acc = UnitMemAccumulator(matrix.shape[1], capacity=matrix.shape[0], reduce=reduce, topk=topk, **kwargs)
    bounds = [0, *[b for b in batches if b is not None], matrix.shape[0]]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        acc.update(torch.from_numpy(matrix[start:stop]), torch.arange(start, stop))
    values = acc.finalize("test")
    acc.close()
    return values


def reference(matrix, reduce):
    """Straight from the spec, in float64, one unit at a time."""
    matrix = np.asarray(matrix, dtype=np.float64)
    out = []
    for column in matrix.T:
        top = int(np.argmax(column))  # first maximal index
        rest = np.delete(column, top)
        mu_max, mu_rest = column[top], (rest.mean() if reduce == "mean" else np.median(rest))
        out.append(0.0 if mu_max + mu_rest == 0 else (mu_max - mu_rest) / (mu_max + mu_rest))
    return np.array(out), np.argmax(matrix, axis=0)


# Columns: distinct values; a dead unit; a tie for the maximum; all equal.
HAND = [[4, 0, 2, 5], [1, 0, 3, 5], [1, 0, 3, 5], [7, 0, 1, 5]]


def test_mean_reduction_hand_computed():
    v = run(HAND, "mean")
    # unit 0: max 7, rest mean (4+1+1)/3 = 2 -> 5/9; unit 2: max 3 (first at index 1), rest mean 2 -> 1/5
    np.testing.assert_allclose(v.unitmem, [5 / 9, 0.0, 1 / 5, 0.0], atol=1e-12)
    assert v.max_sample.tolist() == [3, 0, 1, 0]
    assert v.dead.tolist() == [False, True, False, False]
    np.testing.assert_allclose(v.mu_rest, [2.0, 0.0, 2.0, 5.0])


def test_median_reduction_hand_computed():
    v = run(HAND, "median")
    # unit 0: rest {4,1,1} median 1 -> 6/8; unit 2: rest {2,3,1} median 2 -> 1/5
    np.testing.assert_allclose(v.unitmem, [0.75, 0.0, 1 / 5, 0.0], atol=1e-12)
    assert v.max_sample.tolist() == [3, 0, 1, 0]
    assert v.dead.tolist() == [False, True, False, False]


def test_tie_across_batches_keeps_lowest_index():
    matrix = [[1.0], [9.0], [3.0], [9.0], [9.0]]
    for batches in [(None,), (1,), (2,), (3,), (4,)]:
        v = run(matrix, batches=batches)
        assert v.max_sample.tolist() == [1]
        assert v.top_samples[:, 0].tolist() == [1, 3, 4]


@pytest.mark.parametrize("reduce", ["mean", "median"])
def test_streaming_equals_exact(reduce):
    rng = np.random.default_rng(0)
    matrix = rng.gamma(2.0, 1.0, size=(203, 37)).astype(np.float32)
    matrix[:, 5] = 0  # dead unit
    matrix[[3, 50], 7] = 100  # tie for the max
    expected, argmax = reference(matrix, reduce)
    for batches in [(None,), (1, 2, 64, 200), tuple(range(7, 203, 7))]:
        v = run(matrix, reduce, batches=batches, topk=5)
        np.testing.assert_allclose(v.unitmem, expected, rtol=0, atol=1e-6)
        assert v.max_sample.tolist() == argmax.tolist()
        order = np.argsort(-matrix.astype(np.float64), axis=0, kind="stable")[:5]
        assert v.top_samples.tolist() == order.tolist()
        np.testing.assert_allclose(v.top_values, np.take_along_axis(matrix, order, 0), rtol=0, atol=0)


def test_median_spills_to_disk_past_limit(tmp_path):
    rng = np.random.default_rng(1)
    matrix = rng.random((50, 9)).astype(np.float32)
    acc = UnitMemAccumulator(9, capacity=50, reduce="median", memory_limit_bytes=100, spill_dir=str(tmp_path))
    assert acc.spill_path is not None and acc.spill_path.startswith(str(tmp_path))
    acc.update(torch.from_numpy(matrix), torch.arange(50))
    np.testing.assert_allclose(acc.finalize().unitmem, reference(matrix, "median")[0], atol=1e-6)
    acc.close()
    assert list(tmp_path.iterdir()) == []
    assert median_matrix_bytes(10_000, 8_192) == 327_680_000


def test_mean_memory_does_not_grow_with_samples():
    acc = UnitMemAccumulator(16, capacity=10**9, reduce="mean", topk=4)  # capacity unused by mean
    for start in range(0, 1000, 100):
        acc.update(torch.rand(100, 16), torch.arange(start, start + 100))
    assert acc._top.values.shape == (4, 16)


def test_values_in_unit_interval():
    rng = np.random.default_rng(2)
    v = run(rng.random((40, 30)) ** 4)
    assert np.all((v.unitmem >= 0) & (v.unitmem <= 1))


def test_needs_two_data_points():
    with pytest.raises(AuditError, match="at least 2 data points"):
        run([[1.0, 2.0]])


def test_nan_activations_are_an_error():
    with pytest.raises(AuditError, match="NaN or infinite.*unit 1"):
        run([[1.0, float("nan")], [2.0, 1.0]])


def test_unknown_reduction():
    with pytest.raises(AuditError, match="unknown reduction"):
        UnitMemAccumulator(3, 3, reduce="max")
