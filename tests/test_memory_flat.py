"""What an audit keeps per data point stays small: the analysis's temporary memory does not grow with N."""

import tracemalloc

import numpy as np

from pytest_memaudit.metric import stats


def bootstrap_peak_bytes(n: int, resamples: int) -> int:
    """Peak bytes numpy allocated inside spearman_interval beyond its inputs (tracemalloc sees numpy)."""
    rng = np.random.default_rng(0)
    x, y = rng.random(n), rng.random(n)
    stats.scipy_stats()  # imported outside the measurement
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        result = stats.spearman_interval(x, y, resamples=resamples, seed=0)
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    assert np.isfinite(result.ci_low) and result.ci_low <= result.rho <= result.ci_high
    return peak


def test_the_bootstrap_of_a_correlation_takes_the_same_memory_at_any_n():
    """Each of the 9 characteristics' correlations is bootstrapped over every member: 2,000 resamples
    of up to 20,000 pairs. Ranked in chunks of _BOOTSTRAP_CELLS values, its temporaries stay near
    65 bytes per value of a chunk (about 16 MB), whether the audit saw 2,000 images or 40,000."""
    resamples = 100  # 100 x 20,000 values at 40,000 images: 2M, ranked at once before the chunks were bounded
    small, large = bootstrap_peak_bytes(2_000, resamples), bootstrap_peak_bytes(40_000, resamples)
    inputs = 40_000 * 8 * 4  # x and y, and their NaN-free copies, of the larger audit
    assert small < 25 * 2**20
    assert large - inputs < 25 * 2**20  # was 130 MB with chunks of 4M values


def traced_peak_bytes(compute) -> int:
    """Peak bytes numpy and Python allocated inside ``compute()`` beyond what was there before."""
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        compute()
        return tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()


def test_the_permutations_of_a_membership_test_take_the_same_memory_at_any_n():
    """10,000 relabellings of 40,000 pooled data points are drawn a chunk at a time: about 16 MB
    at any N (64 MB with the chunks of before)."""
    from pytest_memaudit.metric.membership import permutation_test

    rng = np.random.default_rng(0)
    for n in (1_000, 40_000):
        columns = rng.poisson(0.2, size=(n, 23)).astype(np.float64)
        is_member = np.arange(n) < n // 2
        assert traced_peak_bytes(lambda: permutation_test(columns, is_member, 1_000, 0, keep_null=True)) < 20 * 2**20


def test_nearest_neighbours_of_the_sample_are_searched_in_small_blocks():
    """neighbour_distance over its full sample (2,000 view-means of a 640-unit layer): the
    standardized copy (10 MB) and blocks of distances of 4 MB (80 MB in all with the blocks of before)."""
    from pytest_memaudit.metric.imagesignals import NEIGHBOUR_IMAGES, neighbour_distances

    vectors = np.random.default_rng(0).random((NEIGHBOUR_IMAGES, 640)).astype(np.float32)
    assert traced_peak_bytes(lambda: neighbour_distances(vectors)) < 40 * 2**20


def test_what_the_stream_keeps_is_its_arrays_and_nothing_per_batch():
    """40,000 data points streamed in batches of 32, with var_d16's 22 per-image signals, 9
    characteristics and a 32-unit embedding, and a 64-unit layer's view-means: what is kept is
    exactly the rows (sized once for the shard, ``RowStore``) and the view-means' sample, not
    the batches' arrays in lists (an array object and a list slot more per batch and key, and, on
    the CPU heap between forward passes, pinned stretches that grow the heap with every batch)."""
    from pytest_memaudit.metric.imagesignals import NEIGHBOUR_IMAGES, ViewMeans, neighbour_sample
    from pytest_memaudit.pipeline.run import Measured

    n, batch, units = 40_000, 32, 64

    def stream():
        measured = Measured(n, ViewMeans(neighbour_sample(n, seed=0)))
        for start in range(0, n, batch):  # each batch's arrays new, as the stream's are
            measured.add(list(range(start, start + batch)), {f"c{i}": np.full(batch, start + i) for i in range(9)},
                         np.full((batch, 32), start, np.float32), {f"s{i}": np.full(batch, -start) for i in range(22)},
                         {"m": np.full((batch, units), start, np.float32)})
        kept.append(tracemalloc.get_traced_memory()[0])
        first = np.arange(n) // batch * batch  # each data point's batch's first position
        assert np.array_equal(measured.positions, np.arange(n))
        assert np.array_equal(measured.part("characteristics")["c3"], first + 3)
        assert np.array_equal(measured.part("signals")["s21"], -first)
        assert np.array_equal(measured.part("embedding")["embedding"][:, 5], first)
        sampled = measured.view_means.views()
        assert np.array_equal(sampled["rows"]["m"][:, 0], sampled["positions"] // batch * batch)
        assert sampled["rows"]["m"].shape == (NEIGHBOUR_IMAGES, units)

    kept = []
    traced_peak_bytes(stream)
    rows = n * (8 + 9 * 8 + 22 * 8 + 32 * 4) + NEIGHBOUR_IMAGES * (8 + units * 4)
    assert rows <= kept[0] < rows + 2**20
