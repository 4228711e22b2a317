"""The per-(layer, step) integer program of DiTFastAttnV2, solved exactly with OR-Tools CP-SAT.

Problem
-------
Heads h = 0..H-1, candidate methods m = 0..M-1, relative squared error ``r[h, m] >= 0`` (``nan`` is read as
``inf``: never allowed) and saving ``s[m]`` in [0, 1] (fraction of the head's attention FLOPs removed). With binary
``x[h, m]``::

    maximise   sum_{h,m} x[h,m] * s[m]
    subject to sum_m x[h,m] <= 1              for every head          (at most one method per head)
               sum_{h,m} x[h,m] * r[h,m] <= delta                     (error budget of the layer-step)
               x[h,m] = 0  unless  r[h,m] < c * delta / num_heads     (prefilter, strict)

A head with no chosen method stays full attention (``choice[h] = -1``). ``num_heads`` defaults to H.

The prefilter is evaluated exactly (rational arithmetic on the float64 inputs): (h, m) is *allowed* iff ``r``
is finite and ``r * num_heads < c * delta`` as real numbers (no rounding of ``c * delta / num_heads``);
``c = inf`` allows every finite ``r``.

Integer scaling (exact, never admits an assignment over delta)
--------------------------------------------------------------
Let ``delta = f * 2**e`` with f in [0.5, 1) (``math.frexp``) and ``Q = 2**(21 - e)`` (a power of two, so
``delta * Q = f * 2**21`` lies in [2**20, 2**21)). Then::

    r_int[h, m] = ceil(r[h, m] * Q)          B = floor(delta * Q)          (2**20 <= B < 2**21)

computed exactly (``fractions.Fraction`` of the float64 values, so no underflow/overflow/rounding). The integer
budget constraint is ``sum x * r_int <= B``.

*Soundness.* For any assignment admitted by the integer constraint,
``sum x*r <= sum x*r_int/Q <= B/Q <= delta`` (since ``r <= r_int/Q`` and ``B <= delta*Q``), in exact real
arithmetic. So no assignment whose true RSE sum exceeds delta is ever admitted, however close it is.

*Near-completeness.* Let k <= H be the number of compressed heads of an assignment. Since
``r_int < r*Q + 1``, ``sum x*r_int < Q*sum x*r + k``; if ``sum x*r <= delta - k/Q`` then the integer
``sum x*r_int < delta*Q``, hence ``sum x*r_int <= ceil(delta*Q) - 1 <= floor(delta*Q) = B`` and the assignment is
admitted. So only assignments with ``delta - H/Q < sum x*r <= delta`` can be refused, and
``H/Q = H * delta / (f * 2**21) <= H * delta * 2**-20`` (relative slack at most H * 2**-20, i.e. < 6.2e-5 for H = 64).

An allowed (h, m) with ``r_int[h, m] > B`` can never be part of an admitted assignment (all terms are >= 0), so it
is dropped before the solve; ``candidates`` below are the allowed pairs with ``r_int <= B``.

*Savings.* ``s_int[m] = round(s[m] * S)`` with ``S = 2**20`` (``s * S`` is exact; Python's round-half-even). The
solver and the brute force maximise the *integer* objective ``I(x) = sum x * s_int``. With
``F(x) = sum x * s`` (float objective), ``|I(x)/S - F(x)| <= k/(2S)``, so if the integer optimum x* differs from
a float optimum x' (over the admitted set), ``F(x') - F(x*) <= (k' + k*)/(2S) <= H/S`` (k', k* their
numbers of compressed heads): the returned assignment is within ``H/S = H * 2**-20`` of the float optimum, and the
two can differ only when their float objectives differ by less than ``H/S``. A method with ``0 < s <= 2**-21``
gets ``s_int = 0`` and is treated as a zero-saving method (see below).

Tie-breaking (identical in :func:`solve` and :func:`brute_force`)
-----------------------------------------------------------------
Among admitted assignments the returned one is the minimum of the strict total order

1. largest ``I(x) = sum x * s_int``;
2. then smallest ``R(x) = sum x * r_int``;
3. then the lexicographically smallest choice vector ``(choice[0], choice[1], ..., choice[H-1])`` compared as
   integer tuples with ``-1 < 0 < 1 < ... < M-1``: on the lowest-index head where two assignments differ, prefer
   full attention, then the lower method index.

Consequence: a method with ``s_int = 0`` is never chosen — replacing it by full keeps I, does not increase R,
keeps the assignment admitted and is lexicographically smaller. (Zero-saving methods tie with full on the saving;
the tie-break prefers full.) Result fields ``objective``/``rse_sum`` are the float sums (``math.fsum``) of the
chosen ``s``/``r``.

CP-SAT encoding and int64 bounds
--------------------------------
*Stage 1* (priorities 1 and 2 in one objective): maximise ``sum x * (W*s_int - r_int) = W*I(x) - R(x)`` with
``W = Rmax + 1`` where ``Rmax = min(B, sum_h max_m r_int[h, m])`` (max over the candidates of head h) bounds R
of every admitted assignment.
Proof of strictness: if ``I(x) > I(y)`` then ``W*I(x) - R(x) >= W*I(y) + W - R(x) > W*I(y) >= W*I(y) - R(y)``
because ``0 <= R(x) <= Rmax < W`` and ``R(y) >= 0``; if ``I(x) = I(y)`` the objective orders by R. Bound:
``|objective| <= H * (W * S + B) < H * (2**21 * 2**20 + 2**21) < H * 2**42``; for H <= 64 that is < 2**48.
(``objective_value`` of CP-SAT is a double, so V is recomputed in Python integers from the solution.)

*Stage 2* (priority 3), head by head in ascending order, with the heads before h fixed to their final values:
while the incumbent has ``choice[h] >= 0``, re-solve the stage-1 objective with ``choice[h]`` restricted to
``{-1} + {m < choice[h]}`` (the other x[h, m] fixed to 0). The restricted optimum is <= V*, and equals V* iff a
V*-optimal assignment (agreeing on heads < h) has a smaller ``choice[h]``; then it becomes the incumbent (its
choice[h] strictly decreased, so at most M re-solves per head), otherwise choice[h] is minimal and is fixed. Since
``W*I - R`` determines (I, R) (``0 <= R < W``), the incumbent always has the optimal (I*, R*), and after the last
head it is the lexicographic minimum. Heads at -1 need no solve (-1 is the smallest value). Equality constraints
pinning (I*, R*) are deliberately not used: proving a subset-sum equality infeasible is slow for CP-SAT, while
each restricted optimisation is a small multiple-choice knapsack it proves in about a millisecond. The model is
built once; restrictions are variable-domain edits, and each solve is hinted with the incumbent.

Limits: ``H <= MAX_HEADS = 1024`` and ``M <= MAX_METHODS = 64``, beyond them a ValueError is raised. Then the
objective coefficients are at most ``W * S < 2**41`` and CP-SAT's overflow bound ``sum |coef| * 1`` over all
variables is < ``H * M * 2**41 <= 2**57`` (for H <= 64, M <= 8: < 2**50), inside int64; the budget row is
``<= H * M * 2**21``. :func:`brute_force` needs ``H <= 8``.

Determinism: one worker (``num_workers = 1``), fixed ``random_seed``, no parallelism; the only wall-clock
dependency is ``time_limit_s`` (the total budget of all solves). When it is not hit the result is optimal in the
order above and therefore unique, hence identical across runs. When it is hit, the best assignment found so far is
returned with ``optimal=False``: all-full (always admitted) when stage 1 found nothing, the stage-1 incumbent when
stage 1 was cut, or an (I*, R*)-optimal assignment that may not be the lexicographic minimum when stage 2 was cut.
Only that path depends on timing. CP-SAT proves the instances of the tests (H <= 64, M <= 8) in well under a
second; the tests exercise the cut path with a tiny limit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

__all__ = [
    "MAX_HEADS",
    "MAX_METHODS",
    "RSE_SCALE_BITS",
    "SAVING_SCALE",
    "ScaledProblem",
    "SolveResult",
    "brute_force",
    "scale_problem",
    "solve",
]

RSE_SCALE_BITS = 21  # delta * Q lies in [2**20, 2**21)
SAVING_SCALE = 2**20  # S
MAX_HEADS = 1024
MAX_METHODS = 64
BRUTE_FORCE_MAX_HEADS = 8
BRUTE_FORCE_MAX_ASSIGNMENTS = 9**8  # (M+1)**H for M = H = 8
# :func:`solve` enumerates instead of calling CP-SAT when a layer-step has at most this many assignments left
# after the pre-filter (same order, same answer; faster than a CP-SAT start for a handful of heads).
ENUMERATE_MAX_ASSIGNMENTS = 4096
_INT64_SAFE = 2**62
_SEED = 0


@dataclass(frozen=True)
class SolveResult:
    """choice[h] = -1 (full attention) or the chosen method index; objective = sum of chosen savings (float);
    rse_sum = sum of chosen RSE (float); optimal = proven optimal in the tie-break order of the module docstring."""

    choice: np.ndarray  # int32 [H]
    objective: float
    rse_sum: float
    optimal: bool
    solver_time_s: float


@dataclass(frozen=True)
class ScaledProblem:
    """The integer problem shared by :func:`solve` and :func:`brute_force` (see the module docstring)."""

    rse: np.ndarray  # float64 [H, M], nan replaced by inf
    savings: np.ndarray  # float64 [M]
    allowed: np.ndarray  # bool [H, M]: passes the prefilter r * num_heads < c * delta (exact)
    candidate: np.ndarray  # bool [H, M]: allowed and r_int <= budget
    r_int: np.ndarray  # int64 [H, M], ceil(r * Q) on candidates, 0 elsewhere
    s_int: np.ndarray  # int64 [M], round(s * S)
    budget: int  # B = floor(delta * Q)
    q: Fraction  # Q = 2**(21 - e)

    @property
    def num_heads(self) -> int:
        return self.rse.shape[0]

    @property
    def num_methods(self) -> int:
        return self.rse.shape[1]


def _check_real(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a real number, got {v!r}")
    return float(v)


def scale_problem(rse, savings, delta: float, c: float = 1.5, *, num_heads: int | None = None) -> ScaledProblem:
    """Validate the inputs, apply the exact prefilter and the integer scaling of the module docstring."""
    delta = _check_real("delta", delta)
    if not math.isfinite(delta) or delta <= 0:
        raise ValueError(f"delta must be finite and > 0, got {delta!r}")
    c = _check_real("c", c)
    if math.isnan(c) or c <= 0:
        raise ValueError(f"c must be > 0 (inf disables the prefilter), got {c!r}")
    r = np.array(rse, dtype=np.float64)  # copy
    if r.ndim != 2:
        raise ValueError(f"rse must be a 2-D array [H, M], got shape {r.shape}")
    s = np.array(savings, dtype=np.float64)
    if s.ndim != 1 or s.shape[0] != r.shape[1]:
        raise ValueError(f"savings must be a 1-D array of length M = {r.shape[1]} (rse shape {r.shape}), "
                         f"got shape {s.shape}")
    h_count, m_count = r.shape
    if h_count > MAX_HEADS:
        raise ValueError(f"rse has H = {h_count} heads, more than MAX_HEADS = {MAX_HEADS} (int64 bound)")
    if m_count > MAX_METHODS:
        raise ValueError(f"rse has M = {m_count} methods, more than MAX_METHODS = {MAX_METHODS} (int64 bound)")
    if num_heads is None:
        num_heads = h_count
    elif isinstance(num_heads, bool) or not isinstance(num_heads, (int, np.integer)) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
    num_heads = int(num_heads)
    r[np.isnan(r)] = np.inf
    if np.any(r < 0):
        raise ValueError("rse must be >= 0 (nan is allowed and read as inf)")
    if not np.all(np.isfinite(s)) or np.any(s < 0) or np.any(s > 1):
        raise ValueError(f"savings must be finite and in [0, 1], got {s.tolist()}")

    _, exp = math.frexp(delta)
    q = Fraction(2) ** (RSE_SCALE_BITS - exp)
    fdelta = Fraction(delta)
    budget = math.floor(fdelta * q)
    assert 2 ** (RSE_SCALE_BITS - 1) <= budget < 2**RSE_SCALE_BITS
    bound = None if math.isinf(c) else Fraction(c) * fdelta  # allowed iff r * num_heads < c * delta
    allowed = np.zeros(r.shape, dtype=bool)
    candidate = np.zeros(r.shape, dtype=bool)
    r_int = np.zeros(r.shape, dtype=np.int64)
    for h in range(h_count):
        for m in range(m_count):
            v = float(r[h, m])
            if not math.isfinite(v):
                continue
            fv = Fraction(v)
            if bound is not None and not fv * num_heads < bound:
                continue
            allowed[h, m] = True
            vi = math.ceil(fv * q)
            if vi <= budget:
                candidate[h, m] = True
                r_int[h, m] = vi
    s_int = np.array([round(float(v) * SAVING_SCALE) for v in s], dtype=np.int64)
    return ScaledProblem(rse=r, savings=s, allowed=allowed, candidate=candidate, r_int=r_int, s_int=s_int,
                         budget=budget, q=q)


def _result(p: ScaledProblem, choice: np.ndarray, optimal: bool, t: float) -> SolveResult:
    choice = np.asarray(choice, dtype=np.int32)
    chosen = [(h, int(m)) for h, m in enumerate(choice) if m >= 0]
    for h, m in chosen:
        assert p.candidate[h, m]
    assert sum(int(p.r_int[h, m]) for h, m in chosen) <= p.budget
    return SolveResult(choice=choice,
                       objective=math.fsum(float(p.savings[m]) for _, m in chosen),
                       rse_sum=math.fsum(float(p.rse[h, m]) for h, m in chosen),
                       optimal=optimal, solver_time_s=t)


class _CpSat:
    """One CP-SAT model over the candidate variables: at most one per head, the integer budget, and the objective
    max sum x*(w*s_int - r_int). Restrictions (x fixed to 0 or 1) are applied by editing variable domains in the
    model proto, so the model is built once per :func:`solve`."""

    def __init__(self, p: ScaledProblem, cands: list[list[int]], w: int):
        from ortools.sat.python import cp_model

        self._cp_model = cp_model
        self.model = model = cp_model.CpModel()
        self.keys = [(h, m) for h, ms in enumerate(cands) for m in ms]
        self.vars = [model.new_bool_var(f"x_{h}_{m}") for h, m in self.keys]
        self.index = [v.index for v in self.vars]
        by_head: dict[int, list] = {}
        for (h, _), v in zip(self.keys, self.vars):
            by_head.setdefault(h, []).append(v)
        for vs in by_head.values():
            if len(vs) > 1:
                model.add_at_most_one(vs)
        model.add(sum(int(p.r_int[h, m]) * v for (h, m), v in zip(self.keys, self.vars)) <= p.budget)
        model.maximize(sum((w * int(p.s_int[m]) - int(p.r_int[h, m])) * v
                           for (h, m), v in zip(self.keys, self.vars)))
        self.h_count = len(cands)

    def solve(self, fixed: dict[tuple[int, int], int], hint: np.ndarray,
              remaining: float) -> tuple[str, np.ndarray | None]:
        """Solve with x[k] fixed to fixed[k] (others free). Returns (tag, choice), tag in OPTIMAL / FEASIBLE /
        TIMEOUT (choice None when nothing was found)."""
        cp_model = self._cp_model
        if remaining <= 0:
            return "TIMEOUT", None
        proto = self.model.proto
        for k, i in zip(self.keys, self.index):
            dom = proto.variables[i].domain
            lo, hi = (fixed[k], fixed[k]) if k in fixed else (0, 1)
            dom[0], dom[1] = lo, hi
        proto.clear_solution_hint()
        proto.solution_hint.vars.extend(self.index)
        proto.solution_hint.values.extend([int(hint[h] == m) for h, m in self.keys])
        solver = cp_model.CpSolver()
        solver.parameters.num_workers = 1
        solver.parameters.random_seed = _SEED
        solver.parameters.max_time_in_seconds = remaining
        status = solver.solve(self.model)
        if status == cp_model.OPTIMAL:
            tag = "OPTIMAL"
        elif status == cp_model.FEASIBLE:
            tag = "FEASIBLE"
        elif status == cp_model.UNKNOWN:
            return "TIMEOUT", None
        else:  # every restriction used by solve() keeps a feasible point (all-full or the incumbent)
            raise RuntimeError(f"CP-SAT returned {solver.status_name(status)}")
        choice = np.full(self.h_count, -1, dtype=np.int32)
        for (h, m), v in zip(self.keys, self.vars):
            if solver.boolean_value(v):
                choice[h] = m
        return tag, choice


def solve(rse, savings, delta: float, c: float = 1.5, *, num_heads: int | None = None,
          time_limit_s: float = 10.0, enumerate_max: int = ENUMERATE_MAX_ASSIGNMENTS) -> SolveResult:
    """Solve the per-(layer, step) program with CP-SAT, exactly in the integer scaling and the tie-break order
    of the module docstring. rse [H, M], savings [M]; returns choice[h] in {-1 (full), 0..M-1}. Instances with
    at most ``enumerate_max`` admissible assignments (a few heads) are enumerated instead (:func:`brute_force`:
    the same order, so the same answer; 0 always uses CP-SAT)."""
    t0 = time.perf_counter()
    p = scale_problem(rse, savings, delta, c, num_heads=num_heads)
    time_limit_s = _check_real("time_limit_s", time_limit_s)
    if math.isnan(time_limit_s) or time_limit_s <= 0:
        raise ValueError(f"time_limit_s must be > 0, got {time_limit_s!r}")
    h_count, m_count = p.rse.shape
    deadline = t0 + time_limit_s
    # s_int = 0 candidates are dropped: by the tie-break argument of the docstring they are never chosen.
    cands = [[m for m in range(m_count) if p.candidate[h, m] and p.s_int[m] > 0] for h in range(h_count)]
    choice = np.full(h_count, -1, dtype=np.int32)
    if not any(cands):
        return _result(p, choice, True, time.perf_counter() - t0)
    # Fast path, exact: each head's best candidate on its own (max s_int, then min r_int, then lowest index).
    # If these fit the budget together, the budget does not bind, the optimal set is the product of the
    # per-head optimal sets, and its lexicographic minimum is exactly this choice (full never ties: s_int > 0).
    greedy = np.array([min(ms, key=lambda m, h=h: (-int(p.s_int[m]), int(p.r_int[h, m]), m)) if ms else -1
                       for h, ms in enumerate(cands)], dtype=np.int32)
    if sum(int(p.r_int[h, m]) for h, m in enumerate(greedy) if m >= 0) <= p.budget:
        choice = greedy
        return _result(p, choice, True, time.perf_counter() - t0)
    if h_count <= BRUTE_FORCE_MAX_HEADS and math.prod(1 + len(ms) for ms in cands) <= enumerate_max:
        res = brute_force(rse, savings, delta, c, num_heads=num_heads)
        return SolveResult(res.choice, res.objective, res.rse_sum, res.optimal, time.perf_counter() - t0)
    r_max = min(p.budget, sum(max(int(p.r_int[h, m]) for m in ms) for h, ms in enumerate(cands) if ms))
    w = r_max + 1
    assert h_count * m_count * (w * SAVING_SCALE + p.budget) < _INT64_SAFE  # guaranteed by MAX_HEADS, MAX_METHODS
    cp = _CpSat(p, cands, w)

    def value(ch: np.ndarray) -> int:
        return sum(w * int(p.s_int[m]) - int(p.r_int[h, m]) for h, m in enumerate(ch) if m >= 0)

    def done(optimal: bool) -> SolveResult:
        return _result(p, choice, optimal, time.perf_counter() - t0)

    # Stage 1: V* = max W*I - R (priorities 1 and 2).
    fixed: dict[tuple[int, int], int] = {}
    tag, sol = cp.solve(fixed, choice, deadline - time.perf_counter())
    if sol is not None:
        choice = sol
    if tag != "OPTIMAL":
        return done(False)
    v_star = value(choice)
    # Stage 2: lexicographically smallest choice among the V*-optimal assignments, head by head (heads < h fixed).
    for h in range(h_count):
        while choice[h] >= 0:
            trial = dict(fixed)
            trial.update({(h, m): 0 for m in cands[h] if m >= choice[h]})  # choice[h] in {-1} + {m < choice[h]}
            tag, sol = cp.solve(trial, choice, deadline - time.perf_counter())
            if tag != "OPTIMAL":
                return done(False)  # the incumbent is still V*-optimal, maybe not lexicographically smallest
            if value(sol) != v_star:
                break  # no V*-optimal assignment with heads < h fixed has a smaller choice[h]
            choice = sol
        fixed.update({(h, m): int(choice[h] == m) for m in cands[h]})
    return done(True)


def brute_force(rse, savings, delta: float, c: float = 1.5, *, num_heads: int | None = None) -> SolveResult:
    """Reference: enumerate every assignment (H <= 8) over the same prefilter and integer scaling, and return the
    minimum of the same order (max sum s_int, then min sum r_int, then lexicographically smallest choice with
    -1 < 0 < 1 < ...). Non-candidate (h, m) are skipped in the enumeration since they can never be admitted."""
    t0 = time.perf_counter()
    p = scale_problem(rse, savings, delta, c, num_heads=num_heads)
    h_count, m_count = p.rse.shape
    if h_count > BRUTE_FORCE_MAX_HEADS:
        raise ValueError(f"brute_force supports H <= {BRUTE_FORCE_MAX_HEADS}, got H = {h_count}")
    # Options per head in ascending order (-1 first): mixed-radix index order == lexicographic choice order.
    opts = [np.array([-1] + [m for m in range(m_count) if p.candidate[h, m]], dtype=np.int64)
            for h in range(h_count)]
    opt_s = [np.array([0] + [int(p.s_int[m]) for m in o[1:]], dtype=np.int64) for o in opts]
    opt_r = [np.array([0] + [int(p.r_int[h, m]) for m in o[1:]], dtype=np.int64) for h, o in enumerate(opts)]
    radix = [len(o) for o in opts]
    total = math.prod(radix)
    if total > BRUTE_FORCE_MAX_ASSIGNMENTS:
        raise ValueError(f"brute_force would enumerate {total} assignments (> {BRUTE_FORCE_MAX_ASSIGNMENTS})")
    best = None  # (I, -R, -index): larger is better
    chunk = 1 << 20
    for lo in range(0, total, chunk):
        idx = np.arange(lo, min(total, lo + chunk), dtype=np.int64)
        rem = idx.copy()
        i_sum = np.zeros_like(idx)
        r_sum = np.zeros_like(idx)
        for h in reversed(range(h_count)):
            d = rem % radix[h]
            rem //= radix[h]
            i_sum += opt_s[h][d]
            r_sum += opt_r[h][d]
        ok = r_sum <= p.budget
        if not ok.any():
            continue
        i_best = i_sum[ok].max()
        sel = ok & (i_sum == i_best)
        r_best = r_sum[sel].min()
        k = int(np.argmax(sel & (r_sum == r_best)))  # first (lexicographically smallest) index
        key = (int(i_best), -int(r_best), -int(idx[k]))
        if best is None or key > best:
            best = key
    assert best is not None  # the all-full assignment (index 0) is always admitted
    index = -best[2]
    choice = np.full(h_count, -1, dtype=np.int32)
    for h in reversed(range(h_count)):
        index, d = divmod(index, radix[h])
        choice[h] = opts[h][d]
    return _result(p, choice, True, time.perf_counter() - t0)
