"""Per-(layer, step) integer program: CP-SAT against exhaustive enumeration (same scaling and tie-break), the
exactness of the integer scaling, tie-breaking, determinism, the time-limit path and input validation."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dfa2_jax.calibrate.solver import (MAX_HEADS, MAX_METHODS, SAVING_SCALE, brute_force, scale_problem, solve)

INF, NAN = math.inf, math.nan


def _assert_feasible(res, rse, savings, delta, c=1.5, num_heads=None):
    """Exact (rational) checks of the float problem: prefilter respected, sum r <= delta, fields consistent."""
    rse = np.asarray(rse, dtype=np.float64)
    h_count, m_count = rse.shape
    nh = h_count if num_heads is None else num_heads
    assert res.choice.dtype == np.int32 and res.choice.shape == (h_count,)
    assert np.all((res.choice >= -1) & (res.choice < m_count))
    total = Fraction(0)
    for h, m in enumerate(res.choice.tolist()):
        if m < 0:
            continue
        r = float(rse[h, m])
        assert math.isfinite(r)
        if not math.isinf(c):
            assert Fraction(r) * nh < Fraction(c) * Fraction(delta)  # prefilter r < c*delta/H, strict
        assert round(float(savings[m]) * SAVING_SCALE) > 0  # zero-saving methods are never chosen
        total += Fraction(r)
    assert total <= Fraction(delta)
    assert res.rse_sum <= delta
    assert res.rse_sum == math.fsum(float(rse[h, m]) for h, m in enumerate(res.choice) if m >= 0)
    assert res.objective == math.fsum(float(savings[m]) for m in res.choice if m >= 0)


def _same(a, b):
    assert a.choice.tolist() == b.choice.tolist()
    assert a.objective == b.objective
    assert a.rse_sum == b.rse_sum


# ---------------------------------------------------------------------------------------------- random instances

@st.composite
def instances(draw, max_heads=6, max_methods=4):
    h_count = draw(st.integers(1, max_heads))
    m_count = draw(st.integers(1, max_methods))
    delta = draw(st.one_of(st.sampled_from([1e-3, 0.05, 0.125, 0.2, 1.0, 3.0]),
                           st.floats(1e-6, 10.0, allow_nan=False, allow_infinity=False)))
    c = draw(st.one_of(st.sampled_from([0.5, 1.0, 1.5, 3.0, 8.0, INF]), st.floats(0.05, 20.0)))
    num_heads = draw(st.one_of(st.none(), st.integers(1, 8)))
    # Many ties: a few multiples of delta (zeros, infs, nans included), sometimes a free float.
    tied = [0.0, INF, NAN] + [delta * k for k in (1 / 16, 1 / 8, 1 / 4, 1 / 3, 1 / 2, 1.0)]
    r_val = st.one_of(st.sampled_from(tied), st.floats(0.0, 2.0 * delta, allow_nan=False))
    rse = np.array(draw(st.lists(st.lists(r_val, min_size=m_count, max_size=m_count),
                                 min_size=h_count, max_size=h_count)), dtype=np.float64)
    s_val = st.one_of(st.sampled_from([0.0, 1e-7, 0.25, 0.5, 0.75, 1.0]), st.floats(0.0, 1.0))
    savings = np.array(draw(st.lists(s_val, min_size=m_count, max_size=m_count)), dtype=np.float64)
    return rse, savings, delta, c, num_heads


@settings(max_examples=300, deadline=None, derandomize=True)
@given(instances())
def test_cp_sat_equals_brute_force(inst):
    rse, savings, delta, c, num_heads = inst
    got = solve(rse, savings, delta, c, num_heads=num_heads, enumerate_max=0)  # CP-SAT on every instance
    ref = brute_force(rse, savings, delta, c, num_heads=num_heads)
    assert got.optimal and ref.optimal
    _same(got, ref)
    _assert_feasible(got, rse, savings, delta, c, num_heads)
    _same(solve(rse, savings, delta, c, num_heads=num_heads), ref)  # small ones enumerated: the same answer


def test_small_instances_need_no_cp_sat(monkeypatch):
    """A layer-step of a few heads is enumerated: CP-SAT is not started (a binding budget, 4 heads x 3 methods)."""
    from dfa2_jax.calibrate import solver

    def no_cp_sat(*a, **k):
        raise AssertionError("CP-SAT started")

    monkeypatch.setattr(solver, "_CpSat", no_cp_sat)
    rse = np.array([[0.05, 0.02, 0.01]] * 4)
    res = solve(rse, [0.9, 0.5, 0.2], 0.1, c=INF)
    assert res.optimal and res.rse_sum <= 0.1 and res.choice.tolist() == [1, 1, 1, 1]  # 2.0 beats 0.9 + 0.9
    with pytest.raises(AssertionError, match="CP-SAT started"):
        solve(rse, [0.9, 0.5, 0.2], 0.1, c=INF, enumerate_max=0)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(instances(max_heads=4, max_methods=3))
def test_float_optimality_bounds(inst):
    """The documented guarantees against a float/rational enumeration independent of the integer scaling: every
    assignment y allowed by the prefilter with sum r(y) <= delta - k_y/Q is admitted, so the returned objective is
    >= F(y) - H/S."""
    rse, savings, delta, c, num_heads = inst
    res = solve(rse, savings, delta, c, num_heads=num_heads)
    p = scale_problem(rse, savings, delta, c, num_heads=num_heads)
    h_count, m_count = rse.shape
    opts = [[-1] + [m for m in range(m_count) if p.allowed[h, m]] for h in range(h_count)]
    slack = Fraction(h_count, SAVING_SCALE)
    for y in itertools.product(*opts):
        chosen = [(h, m) for h, m in enumerate(y) if m >= 0]
        r_sum = sum((Fraction(float(p.rse[h, m])) for h, m in chosen), Fraction(0))
        if r_sum <= Fraction(delta) - Fraction(len(chosen)) / p.q:
            f_y = sum((Fraction(float(savings[m])) for _, m in chosen), Fraction(0))
            f_res = sum((Fraction(float(savings[m])) for m in res.choice if m >= 0), Fraction(0))
            assert f_res >= f_y - slack


# ------------------------------------------------------------------------------------------------- hand cases

def test_everything_over_prefilter_is_all_full():
    delta, h_count = 0.2, 4
    thr = 1.5 * delta / h_count
    rse = np.array([[thr, thr * 2, INF], [NAN, thr, 1.0], [thr, thr, thr], [5.0, thr, NAN]])
    savings = np.array([1.0, 0.5, 0.25])
    for fn in (solve, brute_force):
        res = fn(rse, savings, delta)
        assert res.choice.tolist() == [-1] * h_count
        assert res.objective == 0.0 and res.rse_sum == 0.0 and res.optimal
    # Just below the threshold is allowed (strict prefilter, exact comparison).
    rse[0, 0] = np.nextafter(thr, 0.0)
    assert solve(rse, savings, delta).choice.tolist() == [0, -1, -1, -1]


def test_num_heads_sets_prefilter():
    rse = np.full((2, 1), 0.02)
    # H = 2: threshold 1.5 * 0.2 / 2 = 0.15 -> both chosen; num_heads = 24: 0.0125 -> none.
    assert solve(rse, [0.5], 0.2).choice.tolist() == [0, 0]
    assert solve(rse, [0.5], 0.2, num_heads=24).choice.tolist() == [-1, -1]
    assert solve(rse, [0.5], 0.2, c=INF, num_heads=24).choice.tolist() == [0, 0]


def test_zero_saving_never_chosen_over_full():
    """s = 0 ties full on the saving; the tie-break (min sum r, then full < any method) prefers full."""
    rse = np.zeros((3, 2))
    for savings in ([0.0, 0.0], [0.0, 2.0**-22]):  # 2**-22 rounds to s_int = 0
        for fn in (solve, brute_force):
            res = fn(rse, savings, 0.1)
            assert res.choice.tolist() == [-1, -1, -1] and res.objective == 0.0
    for fn in (solve, brute_force):
        assert fn(rse, [0.0, 0.5], 0.1).choice.tolist() == [1, 1, 1]


def test_tie_breaks():
    for fn in (solve, brute_force):
        # Equal saving, equal RSE: the lower method index.
        assert fn([[0.01, 0.01]], [0.5, 0.5], 0.1).choice.tolist() == [0]
        # Equal saving: the smaller RSE wins over the lower index.
        assert fn([[0.02, 0.01]], [0.5, 0.5], 0.1).choice.tolist() == [1]
        # Budget fits one of two identical heads: (-1, 0) < (0, -1), i.e. the lower head stays full.
        assert fn([[0.06], [0.06]], [0.5], 0.1, c=INF).choice.tolist() == [-1, 0]
        # Saving first: a larger saving beats a smaller RSE.
        assert fn([[0.01, 0.05]], [0.5, 0.75], 0.1).choice.tolist() == [1]


def test_scaling_never_admits_over_delta():
    for delta in (0.05, 0.1, 0.2, 1.0 / 3.0, 1.0, 7.3, 1e-300, 1e300, 5e-324):
        for r in {delta * (1 + 1e-12), float(np.nextafter(delta, INF))}:
            if r == delta:  # 5e-324 * (1 + 1e-12) rounds back to 5e-324
                continue
            assert Fraction(r) > Fraction(delta)
            for fn in (solve, brute_force):
                res = fn([[r]], [1.0], delta, c=INF)
                assert res.choice.tolist() == [-1]
        # r = delta exactly: r_int = ceil(delta*Q) <= B = floor(delta*Q) iff delta*Q is an integer (else it lies in
        # the documented refusal zone (delta - H/Q, delta]).
        exact = (Fraction(delta) * scale_problem([[0.0]], [1.0], delta).q).denominator == 1
        assert solve([[delta]], [1.0], delta, c=INF).choice.tolist() == ([0] if exact else [-1])
        assert exact == (delta in (1.0, 5e-324))
        # Anything H/Q = 1/Q below delta is admitted.
        target = Fraction(delta) - 1 / scale_problem([[0.0]], [1.0], delta).q
        below = float(target)
        if Fraction(below) > target:
            below = float(np.nextafter(below, 0.0))
        assert solve([[below]], [1.0], delta, c=INF).choice.tolist() == [0]
        # Two heads whose exact sum is just above delta: only one may be chosen.
        half_up = np.nextafter(delta / 2, INF)
        if Fraction(half_up) * 2 > Fraction(delta):
            res = solve([[half_up], [half_up]], [1.0], delta, c=INF)
            assert (res.choice >= 0).sum() == 1
            _assert_feasible(res, [[half_up], [half_up]], [1.0], delta, c=INF)
    # A power-of-two delta scales exactly: two exact halves fill the budget to the last unit and are admitted.
    assert solve([[0.0625], [0.0625]], [1.0], 0.125, c=INF).choice.tolist() == [0, 0]


@settings(max_examples=100, deadline=None, derandomize=True)
@given(delta=st.floats(1e-200, 1e200), h_count=st.integers(1, 8), eps=st.sampled_from([0.0, 1e-16, 1e-12, 1e-9]))
def test_scaling_adversarial_near_delta(delta, h_count, eps):
    rse = np.full((h_count, 1), delta / h_count * (1 + eps))
    res = solve(rse, [1.0], delta, c=INF)
    _assert_feasible(res, rse, [1.0], delta, c=INF)
    exact = Fraction(float(rse[0, 0])) * h_count
    if exact > Fraction(delta):
        assert (res.choice >= 0).sum() < h_count
    else:
        assert (res.choice >= 0).sum() >= h_count - 1  # the refusal zone is only H/Q wide


def _tied_instance(seed, h_count, m_count):
    rng = np.random.default_rng(seed)
    rse = rng.choice([0.0, 0.001, 0.002, 0.004, 0.008, INF], (h_count, m_count))
    savings = np.sort(rng.choice([0.25, 0.5, 0.75, 1.0], m_count))
    return rse, savings


def test_determinism_and_large_instance():
    for h_count, m_count in ((24, 5), (64, 8)):
        rse, savings = _tied_instance(h_count, h_count, m_count)
        a = solve(rse, savings, 0.2)
        b = solve(rse.copy(), savings.copy(), 0.2)
        assert a.optimal and b.optimal
        _same(a, b)
        _assert_feasible(a, rse, savings, 0.2)
    rng = np.random.default_rng(1)
    rse, savings = rng.exponential(0.01, (38, 6)), rng.uniform(0, 1, 6)
    a, b = solve(rse, savings, 0.2), solve(rse, savings, 0.2)
    assert a.optimal and b.optimal
    _same(a, b)


def test_time_limit_returns_best_found():
    # Every RSE just under the prefilter c·δ/H, so together they exceed δ: the budget binds (no fast path).
    _, savings = _tied_instance(7, 64, 8)
    rse = np.random.default_rng(7).choice([0.8, 0.9, 0.95], size=(64, 8)) * 1.5 * 0.2 / 64
    full = solve(rse, savings, 0.2)
    assert full.optimal
    # Cut before the first solve completes -> all full (always admitted).
    res = solve(rse, savings, 0.2, time_limit_s=1e-9)
    assert not res.optimal and res.choice.tolist() == [-1] * 64
    # Cut during the search (the full solve takes many CP-SAT calls): best found so far, feasible.
    res = solve(rse, savings, 0.2, time_limit_s=0.005)
    assert not res.optimal
    _assert_feasible(res, rse, savings, 0.2)
    assert res.objective <= full.objective


# ---------------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, match", [
    (dict(delta=0.0), "delta"), (dict(delta=-1.0), "delta"), (dict(delta=INF), "delta"), (dict(delta=NAN), "delta"),
    (dict(c=0.0), "c must"), (dict(c=-1.5), "c must"), (dict(c=NAN), "c must"),
    (dict(rse=np.zeros(3)), "rse"), (dict(rse=np.zeros((2, 3))), "savings"),
    (dict(savings=np.zeros((2, 1))), "savings"),
    (dict(rse=np.array([[0.1, -0.01]])), "rse"), (dict(rse=np.array([[0.1, -INF]])), "rse"),
    (dict(savings=np.array([0.5, -0.1])), "savings"), (dict(savings=np.array([0.5, 1.5])), "savings"),
    (dict(savings=np.array([0.5, NAN])), "savings"),
    (dict(num_heads=0), "num_heads"), (dict(num_heads=2.5), "num_heads"),
    (dict(rse=np.zeros((MAX_HEADS + 1, 2))), "MAX_HEADS"),
    (dict(rse=np.zeros((1, MAX_METHODS + 1)), savings=np.zeros(MAX_METHODS + 1)), "MAX_METHODS"),
])
def test_invalid_inputs(kwargs, match):
    args = dict(rse=np.array([[0.01, 0.02]]), savings=np.array([0.5, 1.0]), delta=0.1, c=1.5)
    args.update(kwargs)
    for fn in (solve, brute_force):
        with pytest.raises(ValueError, match=match):
            fn(args["rse"], args["savings"], args["delta"], args["c"], num_heads=args.get("num_heads"))


def test_invalid_time_limit_and_brute_force_size():
    with pytest.raises(ValueError, match="time_limit_s"):
        solve([[0.01]], [0.5], 0.1, time_limit_s=0.0)
    with pytest.raises(ValueError, match="brute_force"):
        brute_force(np.zeros((9, 1)), [0.5], 0.1)


def test_empty_shapes():
    for fn in (solve, brute_force):
        assert fn(np.zeros((3, 0)), np.zeros(0), 0.1).choice.tolist() == [-1, -1, -1]
        assert fn(np.zeros((0, 2)), [0.5, 1.0], 0.1).choice.tolist() == []
