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
