"""The membership contrast against independent computations: exact permutation distributions,
figures recomputed in numpy from the activation matrix, and the test's calibration under the null."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import rankdata

from pytest_memaudit.membership import membership_contrast, rank_permutation_test
from pytest_memaudit.stats import holm, jackknife_interval
from pytest_memaudit.unitmem import HOLDOUT, MEMBER, PLANTED, LayerState


def exact_p(values, is_member):
    """One-sided p of the members' rank sum over every relabelling (enumerated)."""
    ranks = rankdata(values)
    observed = ranks[is_member].sum()
    n, k = len(values), int(is_member.sum())
    sums = [ranks[list(chosen)].sum() for chosen in itertools.combinations(range(n), k)]
    return np.mean(np.array(sums) >= observed - 1e-9)


@pytest.mark.parametrize("values", [
    [5.0, 3.0, 8.0, 1.0, 0.0, 2.0, 9.0, 4.0, 7.0],
    [2.0, 0.0, 0.0, 1.0, 0.0, 3.0, 0.0, 0.0, 1.0],  # ties, most of them zeros (argmax counts look like this)
])
def test_permutation_p_matches_the_exact_distribution(values):
    values = np.array(values)
    is_member = np.array([True, False, True, False, False, True, False, True, False])
    expected = exact_p(values, is_member)  # from all 126 relabellings
    [p] = rank_permutation_test(values, is_member, 40_000, seed=1)
    # p = (1 + hits) / (1 + 40000): within 4 standard errors of the exact tail probability
    assert p == pytest.approx(expected, abs=4 * math.sqrt(expected * (1 - expected) / 40_000) + 1e-4)


def test_permutation_p_columns_share_relabellings_and_are_seeded():
    rng = np.random.default_rng(0)
    columns = rng.random((30, 3))
    is_member = rng.random(30) < 0.5
    a = rank_permutation_test(columns, is_member, 500, seed=3)
    assert a == rank_permutation_test(columns, is_member, 500, seed=3)
    assert [rank_permutation_test(columns[:, i], is_member, 500, seed=3)[0] for i in range(3)] == a
    assert all(1 / 501 <= p <= 1 for p in a)
    assert math.isnan(rank_permutation_test(columns, np.ones(30, dtype=bool), 500, seed=0)[0])


def test_the_test_is_calibrated_under_the_null():
    """Labels independent of the values: p-values are uniform, so about 5% fall below 0.05."""
    rng = np.random.default_rng(7)
    p_values = []
    for _ in range(400):
        counts = rng.poisson(0.4, size=40).astype(float)  # zero-inflated, like argmax counts
        p_values += rank_permutation_test(counts, rng.permutation(40) < 20, 300, seed=int(rng.integers(1 << 30)))
    below = np.mean(np.array(p_values) < 0.05)
    assert 0.02 <= below <= 0.08  # binomial 95% band around 0.05 for 400 tests: about 0.03 to 0.07


def build(matrix, labels, groups):
    state = LayerState(matrix.shape[1], groups=10, topk=3)
    state.update(torch.from_numpy(matrix.astype(np.float32)), torch.arange(len(labels)),
                 torch.from_numpy(labels.astype(np.int64)), torch.from_numpy(groups.astype(np.int64)))
    return state


def test_figures_match_a_direct_numpy_computation():
    rng = np.random.default_rng(11)
    n, units = 60, [12, 7]
    labels = np.array([MEMBER] * 30 + [HOLDOUT] * 25 + [PLANTED] * 5)
    groups = rng.integers(0, 10, size=n)
    matrices = [rng.gamma(2, 1, size=(n, u)) for u in units]
    matrices[0][3, :6] += 50  # member 3 is the argmax of six units of layer a
    states = {"a": build(matrices[0], labels, groups), "b": build(matrices[1], labels, groups)}
    contrast = membership_contrast(states, labels, groups, (MEMBER,), (HOLDOUT, PLANTED), permutations=2000, seed=0)
    members = labels == MEMBER
    for name, matrix in zip(("a", "b"), matrices):
        m = contrast.layers[name]
        argmax = matrix.astype(np.float32).argmax(axis=0)
        assert m.member_share == pytest.approx(members[argmax].mean())
        assert m.expected_share == pytest.approx(30 / 60)
        top3 = np.argsort(-matrix.astype(np.float32), axis=0, kind="stable")[:3]
        assert m.topk_member_share == pytest.approx(members[top3].mean())
        assert m.distinct_argmax == len(set(argmax.tolist()))
        assert (m.members, m.holdout) == (30, 30)
        # the jackknife, recomputed: drop each group of data points, redo argmax share and expected share
        theta = []
        for g in range(10):
            keep = groups != g
            sub_argmax = np.flatnonzero(keep)[matrix[keep].astype(np.float32).argmax(axis=0)]
            theta.append(members[sub_argmax].mean() - members[keep].mean())
        expected = jackknife_interval(m.excess, np.array(theta))
        assert (m.excess_interval.se, m.excess_interval.low) == pytest.approx((expected.se, expected.low))
    counts = np.bincount(np.concatenate([m.astype(np.float32).argmax(axis=0) for m in matrices]), minlength=n)
    assert contrast.argmax_counts.tolist() == counts.tolist()
    assert contrast.overall.member_share == pytest.approx(members[counts > 0].dot(counts[counts > 0]) / 19)


def test_planted_images_against_held_out_ones():
    """The planted control's contrast pits the planted images against the other held-out images.
    As in real encoders, a few images are most units' argmax; each planted image has its own unit."""
    rng = np.random.default_rng(3)
    labels = np.array([MEMBER] * 20 + [HOLDOUT] * 36 + [PLANTED] * 4)
    matrix = rng.gamma(2, 1, size=(60, 200)) + 4 * rng.pareto(3, size=(60, 1))  # some images excite every unit
    for j, image in enumerate(range(56, 60)):
        matrix[image, j] += 100  # a planted unit per planted image
    states = {"a": build(matrix, labels, np.arange(60) % 10)}
    contrast = membership_contrast(states, labels, np.arange(60) % 10, (PLANTED,), (HOLDOUT,), permutations=5000,
                                   seed=0)
    assert contrast.overall.members == 4 and contrast.overall.holdout == 36
    assert contrast.pooled.tolist() == list(range(20, 60))
    assert contrast.overall.p_value < 0.01


def test_no_contrast_without_both_sides():
    state = build(np.ones((4, 2)), np.array([MEMBER] * 4), np.zeros(4))
    assert membership_contrast({"a": state}, np.array([MEMBER] * 4), np.zeros(4, dtype=int), (MEMBER,),
                               (HOLDOUT,)) is None


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4 x 0.005 = 0.02, 3 x 0.01 = 0.03, 2 x 0.03 = 0.06, max(0.06, 0.04)
    assert holm([0.01, 0.04, 0.03, 0.005, math.nan]) == pytest.approx([0.03, 0.06, 0.06, 0.02, math.nan],
                                                                          nan_ok=True)
