"""The chance statistics behind ``reuse_lens.compare.overlap``, on plain counts and arrays.

Nothing here knows about circuits or reports: each function takes set sizes (M, the
universe; n = |A|; N = |B|; x = |A∩B|) or a membership mask, so each can be checked
against a brute-force count on its own. scipy loads on first use.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, get_args

import numpy as np

__all__ = [
    "CORRECTIONS",
    "Correction",
    "adjust_p_values",
    "check_correction",
    "check_ks",
    "expected_jaccard",
    "expected_jaccard_from_pmf",
    "hypergeom_sum_pmf",
    "hypergeom_tail",
    "permutation_p_value",
    "plain",
    "random_subset_hits",
    "ratio",
    "sweep_ks",
    "tail_from_pmf",
]

Correction = Literal["holm", "bh", "bonferroni", "none"]
"""How p-values are corrected for testing many pairs at once.

``holm``: Holm's step-down method, which controls the family-wise error rate (the chance
of any false positive) and is uniformly more powerful than Bonferroni. ``bh``:
Benjamini-Hochberg, which controls the false discovery rate (the expected share of false
positives among the pairs called significant). ``bonferroni``: p times the number of
tests. ``none``: the p-values as they are.
"""

CORRECTIONS: tuple[Correction, ...] = get_args(Correction)

_MAX_DRAWS_PER_CHUNK = 1 << 22  # random keys held at once by the permutation test (32 MiB)
_FULL_SWEEP_UP_TO = 64  # sweeps test every k up to this many nodes, then a geometric grid


def ratio(numerator: int, denominator: int) -> float:
    """numerator / denominator, ``nan`` for 0/0-type cases (see ``reuse_lens.compare.overlap``)."""
    return numerator / denominator if denominator else math.nan


def hypergeom_tail(big_m: int, n: int, big_n: int, x: int) -> float:
    """P(X >= x) for X ~ Hypergeometric(M, n, N): ``hypergeom.sf(x - 1, M, n, N)``.

    Hanna et al. 2024 compute P(X > x), one too strict. 1 when x = 0 (no scipy needed)
    and ``nan`` when the universe is empty.
    """
    if big_m == 0:
        return math.nan
    if x == 0:
        return 1.0  # P(X >= 0)
    from scipy.stats import hypergeom

    return float(hypergeom.sf(x - 1, big_m, n, big_n))


def expected_jaccard(big_m: int, n: int, big_n: int) -> float:
    """E[x / (n + N - x)] for x ~ Hypergeometric(M, n, N), summed exactly over the pmf."""
    if big_m == 0 or n + big_n == 0:
        return math.nan
    from scipy.stats import hypergeom

    x = np.arange(max(0, n + big_n - big_m), min(n, big_n) + 1)
    pmf = hypergeom.pmf(x, big_m, n, big_n)
    return float(np.sum(pmf * x / (n + big_n - x)))


def hypergeom_sum_pmf(strata: Iterable[tuple[int, int, int]]) -> np.ndarray:
    """The pmf of X = X_1 + ... + X_k, independent X_i ~ Hypergeometric(M_i, n_i, N_i).

    A stratified null: within each stratum (e.g. the senders of one receiver) the second
    set is redrawn uniformly with its size kept. ``pmf[x]`` is P(X = x); the convolution
    is exact, so tails and expectations carry no Monte Carlo error.
    """
    from scipy.stats import hypergeom

    pmf = np.ones(1)
    for big_m, n, big_n in strata:
        if big_m == 0 or n == 0 or big_n == 0:
            continue  # X_i = 0 for sure: convolving with a point mass at 0 changes nothing
        support = np.arange(0, min(n, big_n) + 1)
        pmf = np.convolve(pmf, hypergeom.pmf(support, big_m, n, big_n))
    return pmf


def tail_from_pmf(pmf: np.ndarray, x: int) -> float:
    """P(X >= x) from a pmf over 0, 1, ...; 1 when x <= 0."""
    if x <= 0:
        return 1.0
    return float(min(1.0, pmf[x:].sum()))


def expected_jaccard_from_pmf(pmf: np.ndarray, n: int, big_n: int) -> float:
    """E[x / (n + N - x)] for x with the given pmf; ``nan`` when n + N = 0."""
    if n + big_n == 0:
        return math.nan
    x = np.arange(len(pmf))
    return float(np.sum(pmf * x / np.maximum(n + big_n - x, 1)))


def check_correction(method: object) -> Correction:
    """``method`` if it names a correction, else a ValueError listing them."""
    if method not in CORRECTIONS:
        raise ValueError(
            f"unknown correction {method!r}; choose one of {', '.join(map(repr, CORRECTIONS))}"
        )
    return method  # type: ignore[return-value]


def adjust_p_values(p_values: Sequence[float], method: Correction) -> list[float]:
    """The p-values adjusted for the ``method``'s multiple-comparison correction.

    The family is the finite entries: a ``nan`` p-value (a test that could not be made,
    e.g. on a kind the model lacks) stays ``nan`` and does not count as a test. Adjusted
    values are capped at 1 and keep the order of the input; a pair is significant at
    level alpha when its adjusted p-value is at most alpha.
    """
    method = check_correction(method)
    values = np.asarray(p_values, dtype=float)
    out = np.full(values.shape, math.nan)
    finite = np.flatnonzero(np.isfinite(values))
    m = len(finite)
    if m == 0:
        return out.tolist()
    tested = values[finite]
    if method == "none":
        adjusted = tested
    elif method == "bonferroni":
        adjusted = np.minimum(1.0, tested * m)
    elif method == "holm":
        # Step down: the i-th smallest (0-based) is multiplied by m - i, and the running
        # maximum keeps the adjusted values in the order of the raw ones.
        order = np.argsort(tested, kind="stable")
        stepped = np.maximum.accumulate(tested[order] * (m - np.arange(m)))
        adjusted = np.empty(m)
        adjusted[order] = np.minimum(1.0, stepped)
    else:
        from scipy.stats import false_discovery_control

        adjusted = np.asarray(false_discovery_control(tested, method="bh"), dtype=float)
    out[finite] = adjusted
    return out.tolist()


def random_subset_hits(
    in_a: np.ndarray, size: int, n_draws: int, rng: np.random.Generator
) -> np.ndarray:
    """For ``n_draws`` uniform random ``size``-subsets of the universe, how many hit A.

    A subset is the ``size`` smallest of i.i.d. uniform keys (a random permutation's
    prefix). Draws go in chunks so that memory stays bounded on large universes.
    """
    universe_size = len(in_a)
    hits = np.zeros(n_draws, dtype=np.int64)
    if size == 0:
        return hits
    chunk = max(1, _MAX_DRAWS_PER_CHUNK // universe_size)
    for start in range(0, n_draws, chunk):
        rows = min(chunk, n_draws - start)
        keys = rng.random((rows, universe_size))
        picked = np.argpartition(keys, size - 1, axis=1)[:, :size]
        hits[start : start + rows] = in_a[picked].sum(axis=1)
    return hits


def permutation_p_value(
    in_a: np.ndarray, size: int, observed: int, n_permutations: int, rng: np.random.Generator
) -> float:
    """``(1 + #{hits >= observed}) / (1 + n_permutations)`` over random ``size``-subsets.

    The observed draw counts as one of the permutations, so the p-value is never 0.
    """
    counts = random_subset_hits(in_a, size, n_permutations, rng)
    return float((1 + np.count_nonzero(counts >= observed)) / (1 + n_permutations))


def sweep_ks(available: int) -> list[int]:
    """Every k up to ``available`` when that is small, else a geometric grid from 1."""
    if available <= _FULL_SWEEP_UP_TO:
        return list(range(1, available + 1))
    grid = np.unique(np.geomspace(1, available, _FULL_SWEEP_UP_TO).round().astype(int))
    return [int(k) for k in grid]


def check_ks(ks: Iterable[int], available: int) -> list[int]:
    """``ks`` as ints, each checked to lie in 1..``available``."""
    chosen = list(ks)
    for k in chosen:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= available:
            raise ValueError(
                f"every k must be an int in 1..{available} (the smaller number of scored "
                f"nodes of the two circuits), got {k!r}"
            )
    return [int(k) for k in chosen]


def plain(value: Any) -> Any:
    """``value`` as plain JSON types: nan and inf become None, unknown objects strings."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return [plain(item) for item in items]
    return str(value)
