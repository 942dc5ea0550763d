"""mapet.stats against hand computations on fixed numbers and closed forms of Student's t."""
import math

import pytest

from mapet import stats


def test_mean_std_by_hand():
    r = stats.mean_std([0.80, 0.90, 1.00])
    # mean 2.7 / 3; deviations -0.1, 0, 0.1 -> sum of squares 0.02 / (3 - 1) = 0.01 -> std 0.1
    assert r["n"] == 3
    assert r["mean"] == pytest.approx(0.9, abs=1e-15)
    assert r["std"] == pytest.approx(0.1, abs=1e-15)
    assert stats.mean_std([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1}


@pytest.mark.parametrize("q", [0.9, 0.95, 0.975, 0.995])
def test_t_quantile_closed_forms(q):
    # df = 1 is the Cauchy distribution: t_q = tan(pi (q - 1/2))
    assert stats.student_t_ppf(q, 1) == pytest.approx(math.tan(math.pi * (q - 0.5)), rel=1e-10)
    # df = 2: t_q = (2q - 1) sqrt(2 / (4 q (1 - q)))
    assert stats.student_t_ppf(q, 2) == pytest.approx((2 * q - 1) * math.sqrt(2 / (4 * q * (1 - q))), rel=1e-10)
    # symmetric
    assert stats.student_t_ppf(1 - q, 7) == pytest.approx(-stats.student_t_ppf(q, 7), rel=1e-12)


def test_t_quantile_tables():
    # printed t tables (two-sided 95%): df 4 -> 2.776, df 9 -> 2.262, df 30 -> 2.042; large df -> normal 1.960
    assert stats.student_t_ppf(0.975, 4) == pytest.approx(2.776, abs=5e-4)
    assert stats.student_t_ppf(0.975, 9) == pytest.approx(2.262, abs=5e-4)
    assert stats.student_t_ppf(0.975, 30) == pytest.approx(2.042, abs=5e-4)
    assert stats.student_t_ppf(0.975, 1e6) == pytest.approx(1.95996, abs=1e-4)
    for df in (1, 3, 10):
        for t in (-2.0, 0.3, 4.0):
            assert stats.student_t_ppf(stats.student_t_cdf(t, df), df) == pytest.approx(t, rel=1e-9)


def test_paired_difference_by_hand():
    a = {0: 0.90, 1: 0.85, 2: 0.88, 3: 0.92, 4: 0.80, 9: 0.5}   # seed 9 has no partner: left out
    b = {0: 0.86, 1: 0.86, 2: 0.84, 3: 0.90, 4: 0.79, 7: 0.1}
    d = stats.paired_difference(a, b)
    # differences 0.04, -0.01, 0.04, 0.02, 0.01: mean 0.02; squared deviations 4, 9, 4, 0, 1 (1e-4) -> 18e-4 / 4
    sd = math.sqrt(18e-4 / 4)
    half = 2.7764451051977987 * sd / math.sqrt(5)   # t_{0.975, 4}
    assert d["n"] == 5 and d["wins"] == 4
    assert d["mean"] == pytest.approx(0.02, abs=1e-12)
    assert d["std"] == pytest.approx(sd, abs=1e-12)
    assert d["low"] == pytest.approx(0.02 - half, abs=1e-9)
    assert d["high"] == pytest.approx(0.02 + half, abs=1e-9)
    assert d["low"] == pytest.approx(-0.006339, abs=1e-6) and d["high"] == pytest.approx(0.046339, abs=1e-6)
    d90 = stats.paired_difference(a, b, confidence=0.90)   # t_{0.95, 4} = 2.1318
    assert d90["high"] - d90["mean"] == pytest.approx(2.131847 * sd / math.sqrt(5), abs=1e-6)


def test_paired_difference_edge_cases():
    one = stats.paired_difference({3: 0.7}, {3: 0.6})
    assert one["n"] == 1 and one["mean"] == pytest.approx(0.1) and math.isnan(one["low"]) and math.isnan(one["high"])
    with pytest.raises(ValueError, match="share no seed"):
        stats.paired_difference({0: 0.1}, {1: 0.2})
    with pytest.raises(TypeError, match="mappings"):
        stats.paired_difference([0.1], [0.2])
    with pytest.raises(ValueError, match="confidence"):
        stats.paired_difference({0: 0.1}, {0: 0.2}, confidence=1.5)
    with pytest.raises(ValueError, match="finite"):
        stats.mean_std([0.1, float("nan")])
    with pytest.raises(ValueError, match="at least one"):
        stats.mean_std([])
