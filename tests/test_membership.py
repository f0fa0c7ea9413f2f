"""The membership contrast against independent computations: exact permutation distributions,
figures recomputed in numpy from the activation matrix, and the test's calibration under the null."""

import itertools
import math

import numpy as np
import pytest
import torch

from conftest import fair_argmax
from pytest_memaudit.metric.membership import membership_contrast, permutation_test
from pytest_memaudit.metric.stats import holm
from pytest_memaudit.metric.unitmem import HOLDOUT, MEMBER, PLANTED, LayerState


def exact_p(values, is_member):
    """One-sided p of the members' sum over every relabelling (enumerated)."""
    observed = values[is_member].sum()
    n, k = len(values), int(is_member.sum())
    sums = [values[list(chosen)].sum() for chosen in itertools.combinations(range(n), k)]
    return np.mean(np.array(sums) >= observed - 1e-9)


@pytest.mark.parametrize("values", [
    [5.0, 3.0, 8.0, 1.0, 0.0, 2.0, 9.0, 4.0, 7.0],
    [2.0, 0.0, 0.0, 1.0, 0.0, 3.0, 0.0, 0.0, 1.0],  # most of them zeros (argmax counts look like this)
])
def test_permutation_p_matches_the_exact_distribution(values):
    values = np.array(values)
    is_member = np.array([True, False, True, False, False, True, False, True, False])
    expected = exact_p(values, is_member)  # from all 126 relabellings
    [p] = permutation_test(values, is_member, 40_000, seed=1)
    # p = (1 + hits) / (1 + 40000): within 4 standard errors of the exact tail probability
    assert p == pytest.approx(expected, abs=4 * math.sqrt(expected * (1 - expected) / 40_000) + 1e-4)


def test_permutation_p_columns_share_relabellings_and_are_seeded():
    rng = np.random.default_rng(0)
    columns = rng.random((30, 3))
    is_member = rng.random(30) < 0.5
    a = permutation_test(columns, is_member, 500, seed=3)
    assert a == permutation_test(columns, is_member, 500, seed=3)
    assert [permutation_test(columns[:, i], is_member, 500, seed=3)[0] for i in range(3)] == a
    assert all(1 / 501 <= p <= 1 for p in a)
    assert math.isnan(permutation_test(columns, np.ones(30, dtype=bool), 500, seed=0)[0])


def test_the_test_is_calibrated_under_the_null():
    """Labels independent of the values: p-values are uniform, so about 5% fall below 0.05."""
    rng = np.random.default_rng(7)
    p_values = []
    for _ in range(400):
        counts = rng.poisson(0.4, size=40).astype(float)  # zero-inflated, like argmax counts
        p_values += permutation_test(counts, rng.permutation(40) < 20, 300, seed=int(rng.integers(1 << 30)))
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
    contrast = membership_contrast(states, labels, (MEMBER,), (HOLDOUT, PLANTED), permutations=2000, seed=0)
    members = labels == MEMBER
    for name, matrix in zip(("a", "b"), matrices):
        m = contrast.layers[name]
        argmax = matrix.astype(np.float32).argmax(axis=0)  # no ties in continuous data
        assert m.member_share == pytest.approx(members[argmax].mean())
        assert m.expected_share == pytest.approx(30 / 60)
        top3 = np.argsort(-matrix.astype(np.float32), axis=0, kind="stable")[:3]
        assert m.topk_member_share == pytest.approx(members[top3].mean())
        assert m.distinct_argmax == len(set(argmax.tolist()))
        assert (m.members, m.holdout) == (30, 30)
        # the interval inverts the permutation test: excess minus the null excess's 97.5% / 2.5% quantiles
        column = np.bincount(argmax, minlength=n)
        null = np.array([column[np.random.default_rng(s).permutation(n)[:30]].sum() / matrix.shape[1] - 0.5
                         for s in range(4000)])
        low, high = m.excess - np.quantile(null, 0.975), m.excess - np.quantile(null, 0.025)
        step = 1 / matrix.shape[1]  # the share moves in steps of one unit; quantiles may differ by one
        assert m.excess_interval.low == pytest.approx(low, abs=step + 1e-9)
        assert m.excess_interval.high == pytest.approx(high, abs=step + 1e-9)
        assert m.excess_interval.se == pytest.approx(null.std(), rel=0.1)
        # wholly above 0 exactly when the one-sided p is below 0.025
        assert (m.excess_interval.low > 0) == (m.p_value < 0.025)
    counts = np.bincount(np.concatenate([m.astype(np.float32).argmax(axis=0) for m in matrices]), minlength=n)
    assert contrast.argmax_counts.tolist() == counts.tolist()
    assert contrast.overall.member_share == pytest.approx(members[counts > 0].dot(counts[counts > 0]) / 19)
    assert contrast.overall.units == 19 and contrast.overall.excluded_units == 0
    # the p-value is the permutation test of the gated share itself: members' total argmax count
    for name, column in [*zip(("a", "b"), (np.bincount(m.astype(np.float32).argmax(axis=0), minlength=n)
                                          for m in matrices)), ("all", counts)]:
        m = contrast.overall if name == "all" else contrast.layers[name]
        pooled = np.isin(labels, (MEMBER, HOLDOUT, PLANTED))
        p = (1 + sum(column[perm].sum() >= column[members].sum() for perm in
                     [np.random.default_rng(s).permutation(np.flatnonzero(pooled))[:30] for s in range(3000)])) / 3001
        assert m.p_value == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / 3000) + 4e-3)


def test_ties_and_dead_units_by_hand():
    """Six pooled data points (members 0-2, held-out 3-5), four units: unit 0 picks member 1;
    unit 1 is dead; unit 2 is the same on every image (constant); unit 3 ties members 0 and 2
    with held-out 4 and 5 (its pick: the fair one among the four). Left out: units 1 and 2."""
    matrix = np.array([
        [1.0, 0, 2, 5],
        [9.0, 0, 2, 1],
        [2.0, 0, 2, 5],
        [1.0, 0, 2, 1],
        [0.5, 0, 2, 5],
        [3.0, 0, 2, 5],
    ])
    labels = np.array([MEMBER] * 3 + [HOLDOUT] * 3)
    groups = np.arange(6)
    contrast = membership_contrast({"a": build(matrix, labels, groups)}, labels, (MEMBER,), (HOLDOUT,),
                                   permutations=2000, seed=0)
    m = contrast.layers["a"]
    pick = fair_argmax(matrix[:, 3])
    assert pick in (0, 2, 4, 5)
    assert (m.units, m.excluded_units) == (2, 2)
    assert m.member_share == pytest.approx((1 + (pick < 3)) / 2)
    assert m.expected_share == 0.5 and m.distinct_argmax == 2
    # exact p: members' count is (1 + [pick is a member]) among counts c with c[1] = 1, c[pick] = 1;
    # over all 20 choices of 3 members of 6, P(sum >= observed) enumerated
    counts = np.zeros(6)
    counts[1] += 1
    counts[pick] += 1
    assert m.p_value == pytest.approx(exact_p(counts, labels == MEMBER), abs=0.03)


def test_many_dead_units_on_exchangeable_data_give_no_excess():
    """16 of 32 units dead, members and held-out images drawn alike: the excess stays near 0 (the
    lowest-index tie-break gave every dead unit to the first member: share 0.75) and the test is
    not significant more often than its level."""
    rng = np.random.default_rng(2)
    excesses, below = [], 0
    for trial in range(60):
        matrix = rng.gamma(2, 1, size=(40, 32))
        matrix[:, 16:] = 0.0
        labels = np.array([MEMBER] * 20 + [HOLDOUT] * 20)
        groups = rng.integers(0, 10, size=40)
        m = membership_contrast({"a": build(matrix, labels, groups)}, labels, (MEMBER,), (HOLDOUT,),
                                permutations=200, seed=trial).layers["a"]
        assert (m.units, m.excluded_units) == (16, 16)
        excesses.append(m.excess)
        below += m.p_value < 0.05
    # each excess is a share of 16 units minus 0.5: sd about 0.125 alone, 0.016 over 60 trials
    assert abs(np.mean(excesses)) < 0.05
    assert below <= 8  # binomial(60, 0.05): P(more than 8) < 0.01


def test_a_blind_layer_has_no_units_to_test():
    matrix = np.full((10, 4), 3.0)
    labels = np.array([MEMBER] * 5 + [HOLDOUT] * 5)
    groups = np.arange(10)
    m = membership_contrast({"a": build(matrix, labels, groups)}, labels, (MEMBER,), (HOLDOUT,),
                            permutations=100, seed=0).layers["a"]
    assert (m.units, m.excluded_units, m.distinct_argmax) == (0, 4, 0)
    assert math.isnan(m.member_share) and math.isnan(m.p_value)


def test_planted_images_against_held_out_ones():
    """The planted control's contrast pits the planted images against the other held-out images.
    As in real encoders, a few images are most units' argmax; each planted image has 30 units of
    its own (the share counts units, so a hub image that is many units' argmax widens its null)."""
    rng = np.random.default_rng(3)
    labels = np.array([MEMBER] * 20 + [HOLDOUT] * 36 + [PLANTED] * 4)
    matrix = rng.gamma(2, 1, size=(60, 200)) + 4 * rng.pareto(3, size=(60, 1))  # some images excite every unit
    for j, image in enumerate(range(56, 60)):
        matrix[image, 30 * j : 30 * (j + 1)] += 100  # 30 planted units per planted image
    states = {"a": build(matrix, labels, np.arange(60) % 10)}
    contrast = membership_contrast(states, labels, (PLANTED,), (HOLDOUT,), permutations=5000,
                                   seed=0)
    assert contrast.overall.members == 4 and contrast.overall.holdout == 36
    assert contrast.pooled.tolist() == list(range(20, 60))
    assert contrast.overall.p_value < 0.01


def test_no_contrast_without_both_sides():
    state = build(np.ones((4, 2)), np.array([MEMBER] * 4), np.zeros(4))
    assert membership_contrast({"a": state}, np.array([MEMBER] * 4), (MEMBER,),
                               (HOLDOUT,)) is None


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4 x 0.005 = 0.02, 3 x 0.01 = 0.03, 2 x 0.03 = 0.06, max(0.06, 0.04)
    assert holm([0.01, 0.04, 0.03, 0.005, math.nan]) == pytest.approx([0.03, 0.06, 0.06, 0.02, math.nan],
                                                                          nan_ok=True)
