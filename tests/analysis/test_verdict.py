"""The matched-KL verdict on made-up points: readings, standard errors by the delta method, and the verdicts."""

import math

import pandas as pd
import pytest

from analysis.verdict import Point, arms_from_points, compare_arms, comparisons_frame, near_frontier

BASE = Point(0.0, 0.2, 0.0, 0.01)


def test_same_kl_difference_and_combined_standard_error():
    arms = {"A": [Point(0.5, 0.5, 0.0, 0.03)], "B": [Point(0.5, 0.4, 0.0, 0.04)]}
    (c,) = compare_arms(arms, BASE)
    assert c.kl == 0.5 and c.difference == pytest.approx(0.1)
    assert c.se == pytest.approx(0.05)  # sqrt(0.03^2 + 0.04^2): the base cancels at equal KL
    assert c.z == pytest.approx(2.0) and c.verdict == "tie"  # |d| <= 2 se
    (c,) = compare_arms(arms, BASE, z=1.9)
    assert c.verdict == "A > B"


def test_the_arm_further_out_is_read_on_its_sqrt_chord_from_the_base():
    # B at KL 1 gained 0.4; at KL 0.25 its sqrt chord gives 0.2 + 0.4 * sqrt(0.25 / 1) = 0.4
    arms = {"A": [Point(0.25, 0.45, 0.0, 0.0)], "B": [Point(1.0, 0.6, 0.0, 0.0)]}
    (c,) = compare_arms(arms, Point(0.0, 0.2, 0.0, 0.0))
    assert c.kl == 0.25 and c.reward_b == pytest.approx(0.4) and c.difference == pytest.approx(0.05)
    assert c.se == 0.0 and c.verdict == "A > B"
    (linear,) = compare_arms(arms, Point(0.0, 0.2, 0.0, 0.0), scale="linear")
    assert linear.reward_b == pytest.approx(0.3)  # 0.2 + 0.4 * 0.25


def test_delta_method_counts_the_base_and_the_kls():
    # d = rA - r0 - (rB - r0) s with s = sqrt(kA / kB); every partial derivative by hand
    kA, rA, kB, rB, r0 = 0.25, 0.45, 1.0, 0.6, 0.2
    se = {"kA": 0.02, "rA": 0.03, "kB": 0.05, "rB": 0.04, "r0": 0.01}
    arms = {"A": [Point(kA, rA, se["kA"], se["rA"])], "B": [Point(kB, rB, se["kB"], se["rB"])]}
    (c,) = compare_arms(arms, Point(0.0, r0, 0.0, se["r0"]))
    s = math.sqrt(kA / kB)
    # the matched KL k* = kA is where the arms are compared, held fixed: A's reading r0 + (rA - r0) sqrt(k*/kA)
    # moves with A's measured KL, B's with B's
    grads = {"rA": 1.0, "r0": -(1 - s), "rB": -s, "kA": -(rA - r0) / (2 * kA), "kB": (rB - r0) * s / (2 * kB)}
    expected = math.sqrt(sum((grads[k] * se[k]) ** 2 for k in grads))
    assert c.se == pytest.approx(expected, rel=1e-9)


def test_several_points_per_arm_interpolate_between_neighbours():
    arms = {"A": [Point(0.25, 0.5), Point(1.0, 0.7)], "B": [Point(0.5625, 0.55)]}
    (c,) = compare_arms(arms, Point(0.0, 0.2))
    # A at 0.5625 lies between its points: sqrt 0.5 -> 1.0, sqrt 0.5625 = 0.75, halfway: 0.6
    assert c.kl == pytest.approx(0.5625) and c.reward_a == pytest.approx(0.6)
    assert c.verdict == "A > B"


def test_never_extrapolates_and_refuses_bad_points():
    with pytest.raises(ValueError, match="kl_pi_a_exact"):
        Point(-0.1, 0.3)
    with pytest.raises(ValueError, match="finite"):
        Point(0.1, float("nan"))
    with pytest.raises(ValueError, match="never left"):
        compare_arms({"A": [Point(0.0, 0.3)], "B": [Point(0.2, 0.3)]}, BASE)
    with pytest.raises(ValueError, match="scale"):
        compare_arms({"A": [Point(0.1, 0.3)], "B": [Point(0.2, 0.3)]}, BASE, scale="log")


def test_near_frontier_and_the_table():
    arms = {"js": [Point(0.5, 0.5, 0.01, 0.01)], "fkl": [Point(0.5, 0.3, 0.01, 0.01)],
            "rkl": [Point(0.5, 0.51, 0.01, 0.01)]}
    ok, rows = near_frontier(arms, BASE, "js")
    assert ok and len(rows) == 2  # js ties rkl, beats fkl
    ok, _ = near_frontier(arms, BASE, "fkl")
    assert not ok
    frame = comparisons_frame(compare_arms(arms, BASE))
    assert list(frame["verdict"]) == ["js > fkl", "tie", "fkl < rkl"]


def test_arms_from_a_points_table():
    points = pd.DataFrame({"arm": ["A", "A", "B"], "kl_pi_a_exact": [0.1, 0.3, 0.2],
                           "kl_pi_a_exact_se": [0.01, 0.02, None], "score/reward": [0.3, 0.4, 0.35],
                           "score/reward_se": [0.02, 0.02, 0.03]})
    arms = arms_from_points(points)
    assert arms["A"][1] == Point(0.3, 0.4, 0.02, 0.02) and arms["B"][0].kl_se == 0.0
    with pytest.raises(KeyError, match="method"):
        arms_from_points(points, arm="method")


def test_sqrt_fit_recovers_the_curve_and_its_scatter():
    from analysis.verdict import fit_sqrt_curve

    base = Point(0.0, 0.2)
    on_curve = [Point(k, 0.2 + 0.3 * k ** 0.5, 0.0, 0.01) for k in (0.5, 2.0)]
    fit = fit_sqrt_curve("A", on_curve, base)
    assert fit.c == pytest.approx(0.3) and fit.se_residual == pytest.approx(0.0, abs=1e-12)
    # the evaluation error alone: c = sum sqrt(k_i)(r_i - r0) / sum k_i, var = sum k_i se_i^2 / (sum k_i)^2
    assert fit.se_eval == pytest.approx(math.sqrt(2.5 * 0.01 ** 2) / 2.5) and fit.se == fit.se_eval
    scattered = [Point(0.5, 0.2 + 0.3 * 0.5 ** 0.5 + 0.05, 0.0, 0.01),
                 Point(2.0, 0.2 + 0.3 * 2 ** 0.5 - 0.05, 0.0, 0.01)]
    fit = fit_sqrt_curve("A", scattered, base)
    assert fit.se_residual > fit.se_eval and fit.se == fit.se_residual


def test_sqrt_fits_compare_at_any_matched_kl():
    from analysis.verdict import compare_sqrt_fits

    base = Point(0.0, 0.2, 0.0, 0.01)
    arms = {"A": [Point(k, 0.2 + 0.3 * k ** 0.5, 0.0, 0.01) for k in (0.5, 2.0)],
            "B": [Point(k, 0.2 + 0.2 * k ** 0.5, 0.0, 0.01) for k in (1.0, 3.0)],
            "C": [Point(k, 0.2 + 0.2 * k ** 0.5 + 0.001, 0.0, 0.01) for k in (0.8,)]}
    fits, rows = compare_sqrt_fits(arms, base, kl=1.0)
    assert [round(f.c, 6) for f in fits][:2] == [0.3, 0.2]
    assert rows[0].verdict == "A > B" and rows[0].difference == pytest.approx(0.1)
    assert rows[0].reward_a == pytest.approx(0.5) and rows[2].verdict == "tie"  # B and C: the same curve
    _, at_four = compare_sqrt_fits(arms, base, kl=4.0)
    assert at_four[0].difference == pytest.approx(0.2) and at_four[0].z == pytest.approx(rows[0].z)
