"""Per-image signals (imagesignals.py) against hand computations, scipy and exact enumeration."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu, norm

from pytest_memaudit.metric.imagesignals import (
    auc,
    contrast_signals,
    delong_interval,
    neighbour_distances,
    signal_columns,
    view_scalars,
)


def test_view_scalars_match_a_hand_computation():
    # One image, 2 views, 2 units: views (1, 3) and (3, 1); mean (2, 2), per-unit variance 1 and 1.
    per_view = torch.tensor([[[1.0, 3.0], [3.0, 1.0]], [[2.0, 2.0], [2.0, 2.0]]])
    scalars = view_scalars(per_view)
    assert scalars["activation_norm"].tolist() == pytest.approx([2.0, 2.0])  # sqrt((4 + 4) / 2)
    assert scalars["view_alignment"].tolist() == pytest.approx([-(1 + 1) / 8, 0.0])  # identical views: 0
    assert scalars["mean"].tolist() == [[2.0, 2.0], [2.0, 2.0]]


def test_view_scalars_against_float64_numpy_on_random_views():
    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, size=(5, 4, 7))
    scalars = view_scalars(torch.from_numpy(x).float())
    mean = x.mean(axis=1)
    spread = ((x - mean[:, None]) ** 2).mean(axis=1).sum(axis=1)
    np.testing.assert_allclose(scalars["view_alignment"].numpy(), -spread / (mean ** 2).sum(axis=1), rtol=1e-5)
    np.testing.assert_allclose(scalars["activation_norm"].numpy(), np.sqrt((mean ** 2).mean(axis=1)), rtol=1e-6)
    assert "view_alignment" not in view_scalars(torch.ones(3, 1, 4))  # one view: no spread to measure


def test_neighbour_distances_by_hand():
    # Columns standardized: column 0 of (0, 1, 3) has mean 4/3 and sd sqrt(14/9); column 1 is
    # constant and left out; so distances are |differences| / sd of column 0.
    x = np.array([[0.0, 5.0], [1.0, 5.0], [3.0, 5.0]])
    sd = math.sqrt(((0 - 4 / 3) ** 2 + (1 - 4 / 3) ** 2 + (3 - 4 / 3) ** 2) / 3)
    np.testing.assert_allclose(neighbour_distances(x), np.array([1, 1, 2]) / sd, rtol=1e-12)


def test_auc_matches_scipy_mann_whitney_with_ties():
    rng = np.random.default_rng(1)
    members, heldout = rng.integers(0, 5, 13).astype(float), rng.integers(0, 5, 29).astype(float)
    u = mannwhitneyu(members, heldout).statistic
    assert auc(members, heldout) == pytest.approx(u / (13 * 29), abs=1e-12)
    # By hand: members (2, 3), held-out (1, 2): pairs 2>1, 2=2, 3>1, 3>2 -> (1 + .5 + 1 + 1) / 4
    assert auc([2, 3], [1, 2]) == pytest.approx(3.5 / 4)


def test_delong_interval_matches_the_pairwise_formula():
    rng = np.random.default_rng(2)
    members, heldout = rng.normal(0.5, 1, 17), np.round(rng.normal(0, 1, 23), 1)
    psi = (members[:, None] > heldout[None]).astype(float) + 0.5 * (members[:, None] == heldout[None])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    se = math.sqrt(v10.var(ddof=1) / 17 + v01.var(ddof=1) / 23)
    z = norm.ppf(0.975)
    low, high = delong_interval(members, heldout)
    assert (low, high) == pytest.approx((psi.mean() - z * se, psi.mean() + z * se), abs=1e-12)
    assert delong_interval([3.0, 4.0], [1.0, 2.0]) == (1.0, 1.0)  # complete separation: no spread


def test_delong_interval_covers_the_true_auc():
    # Normal(delta, 1) against Normal(0, 1): true AUC = Phi(delta / sqrt 2). 300 draws at n 30/60:
    # coverage within binomial noise of 95% (3 sd: 0.89 to 1.0).
    rng = np.random.default_rng(3)
    delta = 0.8
    truth = norm.cdf(delta / math.sqrt(2))
    hits = 0
    for _ in range(300):
        low, high = delong_interval(rng.normal(delta, 1, 30), rng.normal(0, 1, 60))
        hits += low <= truth <= high
    assert 0.89 <= hits / 300 <= 1.0


def test_permutation_p_matches_exact_enumeration_and_scipy():
    values = np.array([3.1, 0.2, 2.5, 1.7, 0.9, 2.2, 0.4, 1.1, 2.9])
    is_member = np.zeros(9, dtype=bool)
    is_member[[0, 2, 5]] = True
    ranks = values.argsort().argsort() + 1  # no ties
    observed = ranks[is_member].sum()
    splits = list(itertools.combinations(range(9), 3))
    exact = sum(ranks[list(s)].sum() >= observed for s in splits) / len(splits)
    scipy_p = mannwhitneyu(values[is_member], values[~is_member], alternative="greater", method="exact").pvalue
    assert exact == pytest.approx(scipy_p)
    (result,) = contrast_signals({("activation_norm", "x"): values}, is_member, permutations=20000, seed=0)
    # Permutation p = (1 + hits) / (1 + P): within 4 binomial sd of the exact p.
    assert abs(result.p_value - exact) < 4 * math.sqrt(exact * (1 - exact) / 20000) + 1 / 20000
    assert (result.n_members, result.n_heldout) == (3, 6)
    assert result.estimate == pytest.approx(auc(values[is_member], values[~is_member]))


def test_contrast_signals_shares_relabellings_and_skips_missing_values():
    rng = np.random.default_rng(4)
    is_member = np.arange(40) < 10
    strong = np.where(is_member, 5.0, 0.0) + rng.normal(0, 1, 40)
    null = rng.normal(0, 1, 40)
    with_gap = null.copy()
    with_gap[[0, 30]] = np.nan
    results = contrast_signals({("view_alignment", "a"): strong, ("activation_norm", "a"): null,
                                ("loss", "model"): with_gap}, is_member, permutations=999, seed=1)
    by_signal = {r.signal: r for r in results}
    assert by_signal["view_alignment"].p_value == pytest.approx(1 / 1000)
    assert by_signal["view_alignment"].auc > 0.95 and by_signal["view_alignment"].low > 0.5
    assert by_signal["activation_norm"].p_value > 0.01
    gap = by_signal["loss"]
    assert (gap.n_members, gap.n_heldout) == (9, 29)
    assert gap.auc == pytest.approx(auc(with_gap[1:10], np.delete(with_gap, [0, 30])[9:]))


def test_signal_columns_orders_layers_and_negates_the_loss():
    pooled = np.array([0, 2, 3])
    streamed = {"a": {"view_alignment": np.array([1.0, 9, 2, 3]), "activation_norm": np.array([4.0, 9, 5, 6])}}
    means = {"a": np.array([[0.0], [9], [1], [3]])}
    columns = signal_columns(streamed, means, {"a": np.array([2, 0, 1])}, pooled, ["a"], loss=np.array([.1, 9, .2, .3]))
    assert list(columns) == [("view_alignment", "a"), ("activation_norm", "a"), ("neighbour_distance", "a"),
                             ("argmax_units", "a"), ("loss", "model")]
    assert columns[("view_alignment", "a")].tolist() == [1, 2, 3]
    assert columns[("loss", "model")].tolist() == [-.1, -.2, -.3]
    sd = np.std([0.0, 1, 3])
    np.testing.assert_allclose(columns[("neighbour_distance", "a")], np.array([1, 1, 2]) / sd)


def test_a_column_alike_for_every_image_is_no_test():
    """A blind network's per-image values are all alike: no test (p NaN, left out of the verdict), not p = 1."""
    is_member = np.array([True, True, False, False, False])
    varied = np.array([3.0, 2.0, 1.0, 0.5, 0.2])
    results = contrast_signals({("view_alignment", "a"): np.full(5, 0.25), ("argmax_units", "a"): np.zeros(5),
                                ("activation_norm", "a"): varied}, is_member, 99, 0)
    p = {r.signal: r.p_value for r in results}
    assert math.isnan(p["view_alignment"]) and math.isnan(p["argmax_units"])
    # members hold the two largest values: 1 of C(5, 2) = 10 labellings is as extreme, p about 1/10
    assert 0.03 < p["activation_norm"] < 0.2
