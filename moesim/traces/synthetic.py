"""Synthetic routing traces: per-layer Zipf expert popularity plus temporal reuse.

The generator, per MoE layer ``l``:

1. ranks the experts by a seeded random permutation and gives the expert of popularity rank ``r``
   (0-based) the weight ``(r + 1) ** -zipf_s`` (``zipf_s = 0``: uniform);
2. for every token draws ``top_k`` distinct experts without replacement in proportion to those
   weights (exponential races, equivalent to Gumbel-top-k / Plackett-Luce successive sampling),
   first drawn at rank 0;
3. with probability ``reuse_prob`` per rank, keeps the previous token's expert at that
   (layer, rank) instead (never on the first token). Reused experts are placed first; the other
   ranks take the token's fresh draws in order, skipping any expert already reused, so the row
   stays distinct. ``reuse_prob = 1`` repeats the first token's row forever;
4. gives the ranks gate weights that decrease with rank and sum to 1 (softmax of sorted
   standard-normal logits).

All randomness comes from ``numpy.random.SeedSequence(seed)`` (one spawned child stream per
purpose), so a seed gives the same trace on every machine and numpy release that keeps the
``Generator`` streams stable. Work is vectorised over tokens and layers: the race winners are
found by sorting only the times below a per-layer threshold (rows with ties take the plain
``argpartition`` rule, which defines the result), and the reuse chain is resolved in rounds of
equal chain depth, or by fixed-point sweeps when chains are deep, rather than token by token.
These are speed choices only: for a seed the output is the same byte for byte as the plain
row-by-row statement of the algorithm (checked in ``tests/traces/test_synthetic_speed_equivalence.py``).
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from moesim.errors import InputError
from moesim.traces.format import FORMAT_VERSION, Trace

#: Identifies the algorithm above; bump it if the generated values ever change for a given seed.
GENERATOR_VERSION = 1

_SOURCE = "moesim.traces.synthesize"
_CHUNK_ENTRIES = 1 << 22


class SyntheticTraceConfig(BaseModel):
    """The ``trace.synthetic`` block of a scenario: how to synthesise the routing at run time."""

    model_config = ConfigDict(extra="forbid")

    tokens: int = Field(default=4096, ge=1, description="rows (token-steps) to generate")
    zipf_s: float = Field(
        default=1.0, ge=0, allow_inf_nan=False, description="Zipf exponent of expert popularity (0 = uniform)"
    )
    reuse_prob: float = Field(
        default=0.3, ge=0, le=1, description="probability a rank repeats the previous token's expert"
    )
    seed: int | None = Field(default=None, ge=0, description="None: derived from the scenario seed")
    published: str | None = Field(
        default=None,
        description=(
            "NAME[:SUBSET]: generate from routing statistics a paper published (see "
            "moesim.traces.synthetic.PUBLISHED_STATS, e.g. mixtral-8x7b) instead of zipf_s/reuse_prob"
        ),
    )

    @model_validator(mode="after")
    def _check_published(self):
        if self.published is not None:
            try:
                parse_published(self.published)
            except InputError as exc:
                raise ValueError(exc.message) from None
            both = sorted({"zipf_s", "reuse_prob"} & self.model_fields_set)
            if both:
                raise ValueError(f"published replaces zipf_s and reuse_prob; drop {', '.join(both)}")
        return self

    @model_serializer(mode="wrap")
    def _drop_unused_published(self, handler):
        d = handler(self)
        if isinstance(d, dict) and d.get("published", 0) is None:  # unused: old scenario hashes unchanged
            d.pop("published")
        return d

    def resolved_seed(self, scenario_seed: int) -> int:
        """``seed`` if set, else one derived from the scenario seed (see :func:`derived_seed`)."""
        return self.seed if self.seed is not None else derived_seed(scenario_seed)

    def make(self, *, layers, num_experts: int, top_k: int, scenario_seed: int = 0, model_name: str = "",
             num_layers: int | None = None) -> Trace:
        """Synthesise the trace this block describes for a model's MoE ``layers``."""
        if self.published is not None:
            return synthesize_published(
                self.published,
                num_tokens=self.tokens,
                seed=self.resolved_seed(scenario_seed),
                layers=layers,
                num_layers=max(int(x) for x in layers) + 1 if num_layers is None else num_layers,
                num_experts=num_experts,
                top_k=top_k,
                model_name=model_name or None,
            )
        return synthesize(
            num_tokens=self.tokens,
            layers=layers,
            num_experts=num_experts,
            top_k=top_k,
            zipf_s=self.zipf_s,
            reuse_prob=self.reuse_prob,
            seed=self.resolved_seed(scenario_seed),
            model_name=model_name,
        )


def derived_seed(scenario_seed: int) -> int:
    """The generator seed used when ``trace.synthetic.seed`` is unset: the first 32-bit word of
    ``SeedSequence(scenario_seed)`` (no global random state)."""
    return int(np.random.SeedSequence(scenario_seed).generate_state(1)[0])


def _bad(field: str, msg: str) -> InputError:
    return InputError(msg, source=_SOURCE, field=field)


def _check_args(num_tokens, layers, num_experts, top_k, zipf_s, reuse_prob, seed) -> tuple[int, ...]:
    def is_int(x):
        return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))

    if not is_int(num_tokens) or num_tokens < 1:
        raise _bad("num_tokens", f"expected an integer >= 1, got {num_tokens!r}")
    try:
        ls = tuple(layers)
    except TypeError:
        raise _bad("layers", f"expected a list of model layer indices, got {layers!r}") from None
    if not ls or not all(is_int(x) and x >= 0 for x in ls) or any(b <= a for a, b in zip(ls, ls[1:])):
        raise _bad("layers", f"expected a non-empty, strictly increasing list of layer indices >= 0, got {ls!r}")
    if not is_int(num_experts) or num_experts < 1:
        raise _bad("num_experts", f"expected an integer >= 1, got {num_experts!r}")
    if not is_int(top_k) or not 1 <= top_k <= num_experts:
        raise _bad("top_k", f"expected an integer from 1 to num_experts={num_experts}, got {top_k!r}")
    if not isinstance(zipf_s, (int, float, np.number)) or not math.isfinite(zipf_s) or zipf_s < 0:
        raise _bad("zipf_s", f"expected a finite number >= 0, got {zipf_s!r}")
    if not isinstance(reuse_prob, (int, float, np.number)) or not 0 <= reuse_prob <= 1:
        raise _bad("reuse_prob", f"expected a probability in [0, 1], got {reuse_prob!r}")
    if not is_int(seed) or seed < 0:
        raise _bad("seed", f"expected an integer >= 0, got {seed!r}")
    return tuple(int(x) for x in ls)


def synthesize(
    *,
    num_tokens: int,
    layers,
    num_experts: int,
    top_k: int,
    zipf_s: float = 1.0,
    reuse_prob: float = 0.3,
    seed: int = 0,
    model_name: str = "",
) -> Trace:
    """A synthetic trace of ``num_tokens`` rows over the given model ``layers`` (MoE layer indices).

    ``num_experts`` experts per layer, ``top_k`` distinct per (token, layer); ``zipf_s`` is the
    popularity exponent (0 = uniform), ``reuse_prob`` the chance that a rank repeats the previous
    token's expert at the same layer and rank. Deterministic in ``seed``. Experts are int16 (int32
    above 32767 experts), weights float16. Bad arguments raise :class:`InputError`.
    """
    layers = _check_args(num_tokens, layers, num_experts, top_k, zipf_s, reuse_prob, seed)
    T, L, E, K = int(num_tokens), len(layers), int(num_experts), int(top_k)
    s_perm, s_pick, s_reuse, s_gate = np.random.SeedSequence(seed).spawn(4)
    rng_perm = np.random.default_rng(s_perm)
    rng_pick = np.random.default_rng(s_pick)
    rng_reuse = np.random.default_rng(s_reuse)
    rng_gate = np.random.default_rng(s_gate)

    # 1. popularity: log-weight of each expert per layer; the rank order is a seeded permutation
    rank_logw = -float(zipf_s) * np.log1p(np.arange(E, dtype=np.float64))
    logw = np.empty((L, E))
    for l in range(L):
        logw[l, rng_perm.permutation(E)] = rank_logw

    # 2. fresh draws: K distinct experts by weighted sampling without replacement, first drawn first
    cand = _race_top_k(rng_pick, logw, T, K)

    # 3. temporal reuse per (token, layer, rank)
    if reuse_prob > 0:
        reuse = rng_reuse.random((T, L, K)) < reuse_prob
        reuse[0] = False
    else:
        reuse = np.zeros((T, L, K), dtype=bool)
    experts = _resolve_reuse(cand, reuse)

    # 4. gate weights: softmax of sorted standard-normal logits, decreasing by rank
    z = rng_gate.standard_normal((T, L, K), dtype=np.float32)
    z = -np.sort(-z, axis=2)
    z -= z[:, :, :1]
    np.exp(z, out=z)
    z /= z.sum(axis=2, keepdims=True)
    weights = z.astype(np.float16)

    dtype = np.int16 if E <= np.iinfo(np.int16).max else np.int32
    params = {
        "tokens": T,
        "num_experts": E,
        "top_k": K,
        "zipf_s": float(zipf_s),
        "reuse_prob": float(reuse_prob),
        "seed": int(seed),
        "layers": list(layers),
        "generator_version": GENERATOR_VERSION,
    }
    meta = {
        "format_version": FORMAT_VERSION,
        "model": model_name,
        "num_experts": E,
        "top_k": K,
        "layers": list(layers),
        "source": (
            f"synthetic: moesim.traces.synthetic (tokens={T}, layers={_span(layers)}, num_experts={E}, "
            f"top_k={K}, zipf_s={float(zipf_s):g}, reuse_prob={float(reuse_prob):g}, seed={int(seed)})"
        ),
        "licence": "Apache-2.0 (generated by moesim; no third-party data)",
        "captured_with": (
            f"moesim.traces.synthetic.synthesize, generator v{GENERATOR_VERSION}: per-layer Zipf "
            "popularity over a seeded expert permutation, weighted sampling without replacement "
            "(exponential races), per-rank temporal reuse, softmax gate weights"
        ),
        "synthetic": params,
    }
    return Trace(experts=experts.astype(dtype, copy=False), weights=weights, meta=meta)


def _span(layers: tuple[int, ...]) -> str:
    if len(layers) > 2 and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return "[" + ",".join(str(x) for x in layers) + "]"


def _race_top_k(rng: np.random.Generator, logw: np.ndarray, T: int, K: int) -> np.ndarray:
    """``[T, L, K]`` int32: per (token, layer), K distinct experts sampled without replacement with
    probabilities proportional to ``exp(logw[l])``, in sampling order.

    Exponential races: expert ``e`` finishes at ``Exp(1) / w_e``; the first K to finish, in order,
    are a weighted sample without replacement (the same law as Gumbel-top-k, cheaper to draw).
    The finishing times are float32 ``standard_exponential`` draws times ``1 / w_e`` (float32),
    drawn in chunks of whole tokens; the result is defined as ``argpartition`` of a row's times
    followed by a stable ``argsort`` of the K selected (:func:`_top_k_rows_reference`). Rows whose
    K+1 smallest times are distinct have exactly one answer (the K smallest, increasing), which
    :func:`_top_k_rows` finds faster; the rare rows with ties are answered by the reference.
    """
    L, E = logw.shape
    inv_w = np.exp(-logw).astype(np.float32)
    out = np.empty((T, L, K), dtype=np.int32)
    rows = max(1, _CHUNK_ENTRIES // (L * E))
    buf = np.empty((min(rows, T), L, E), dtype=np.float32)
    thr = _race_thresholds(inv_w, K)
    for a in range(0, T, rows):
        b = min(T, a + rows)
        key = buf[: b - a]
        rng.standard_exponential(out=key, dtype=np.float32)  # the same stream as size=(b - a, L, E)
        key *= inv_w
        if K == E:
            out[a:b] = np.argsort(key, axis=2, kind="stable")
        elif thr is None:
            out[a:b] = _top_k_rows_reference(key.reshape(-1, E), K).reshape(b - a, L, K)
        else:
            out[a:b] = _top_k_rows(key, thr, K).reshape(b - a, L, K)
    return out


def _top_k_rows_reference(key: np.ndarray, K: int) -> np.ndarray:
    """``[R, K]``: per row of ``key`` ``[R, E]``, ``argpartition`` then a stable ``argsort`` of the
    K selected (the definition of the race's result, ties included)."""
    part = np.argpartition(key, K - 1, axis=1)[:, :K]
    order = np.argsort(np.take_along_axis(key, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


#: A layer's race threshold is set so that a row has fewer than K+1 times below it with about this
#: probability (Poisson approximation); such rows, and rows with ties, take the reference path.
_RACE_MISS_PROB = 0.02


def _race_thresholds(inv_w: np.ndarray, K: int) -> np.ndarray | None:
    """Per layer, a time ``theta_l`` (float32 ``[L, 1]``) below which a row of the race has about
    ``mu`` experts, ``mu`` chosen so that fewer than K+1 fall below it with probability
    :data:`_RACE_MISS_PROB`; ``None`` where filtering would not pay (the threshold would keep more
    than half of the experts) or the packed sort key of :func:`_top_k_rows` would not fit.

    Only speed depends on these values, never the result."""
    L, E = inv_w.shape
    rows = max(1, _CHUNK_ENTRIES // (L * E))
    if K >= E or int(rows * L - 1).bit_length() + 31 + max(1, int(E - 1).bit_length()) > 64:
        return None
    # mu: P(Poisson(mu) <= K) = miss probability (bisection on the log of the Poisson CDF)
    def log_cdf(mu: float) -> float:
        terms = [j * math.log(mu) - math.lgamma(j + 1) for j in range(K + 1)]
        top = max(terms)
        return top + math.log(sum(math.exp(t - top) for t in terms)) - mu

    lo, hi = float(K + 1), float(4 * (K + 1) + 64)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if log_cdf(mid) > math.log(_RACE_MISS_PROB) else (lo, mid)
    mu = hi
    if mu > 0.5 * E:
        return None
    with np.errstate(divide="ignore", over="ignore"):
        w = 1.0 / inv_w.astype(np.float64)  # P(time_e < theta) = 1 - exp(-theta w_e)
    reach = (w > 0).sum(axis=1)

    def expected(theta):
        return -np.expm1(-theta[:, None] * w).sum(axis=1)

    lo = np.zeros(L)
    hi = np.ones(L)
    for _ in range(2100):  # float64 reaches 1e308 well within this many doublings
        short = (expected(hi) < mu) & (reach >= mu)
        if not short.any():
            break
        hi = np.where(short, hi * 2.0, hi)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        below = expected(mid) < mu
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    theta = np.where(reach >= mu, hi, np.inf)  # too few reachable experts: keep every finite time
    with np.errstate(over="ignore"):
        return theta.astype(np.float32)[:, None]


def _top_k_rows(key: np.ndarray, thr: np.ndarray, K: int) -> np.ndarray:
    """``[R, K]`` int32 for the rows of ``key`` ``[n, L, E]`` (row r = token r // L, layer r % L):
    the same as :func:`_top_k_rows_reference`, by sorting only the times below the layer's
    threshold ``thr`` ``[L, 1]``.

    A row with at least K+1 times below its threshold whose K+1 smallest are distinct has one
    answer, its K smallest in increasing order. Those times are positive finite float32, whose bit
    patterns sort like the values, so one stable sort of ``row | time bits | expert`` packed in a
    uint64 orders every row's candidates at once. Other rows (too few below the threshold, ties,
    NaN) take the reference path on their full row, which gives them their original answer.
    """
    n, L, E = key.shape
    R = n * L
    flat = key.reshape(R, E)
    eb = max(1, int(E - 1).bit_length())
    hit = np.flatnonzero(key < thr)
    row = hit // E
    packed = row.astype(np.uint64) << np.uint64(31 + eb)
    packed |= flat.ravel()[hit].view(np.uint32).astype(np.uint64) << np.uint64(eb)
    packed |= (hit - row * E).astype(np.uint64)
    packed.sort(kind="stable")  # rows are already in order: the merge sort only sorts inside rows
    cnt = np.bincount(row, minlength=R)
    good = np.flatnonzero(cnt > K)
    first = np.cumsum(cnt)[good] - cnt[good]
    sel = packed[first[:, None] + np.arange(K + 1)]
    t = sel >> np.uint64(eb)
    ok = (t[:, 1:] > t[:, :-1]).all(axis=1)
    res = np.empty((R, K), dtype=np.int32)
    res[good[ok]] = sel[ok, :K] & np.uint64((1 << eb) - 1)
    bad = np.ones(R, dtype=bool)
    bad[good[ok]] = False
    bad = np.flatnonzero(bad)
    if bad.size:
        res[bad] = _top_k_rows_reference(flat[bad], K)
    return res


def _fill_rows(prev: np.ndarray, m: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Rows ``[n, K]``: reused ranks (``m``) take ``prev``; the other ranks take, in order, the
    candidates ``c`` that are not among the reused experts."""
    reused = np.where(m, prev, -1)
    taken = c == reused[:, :1]
    for k in range(1, c.shape[1]):
        taken |= c == reused[:, k : k + 1]
    avail = np.take_along_axis(c, np.argsort(taken, axis=1, kind="stable"), axis=1)
    slot = np.cumsum(~m, axis=1)
    slot -= 1
    np.maximum(slot, 0, out=slot)
    return np.where(m, prev, np.take_along_axis(avail, slot, axis=1))


def _resolve_reuse(cand: np.ndarray, reuse: np.ndarray) -> np.ndarray:
    """Apply per-rank reuse of the previous token's experts to fresh candidates ``cand``.

    Rows with no reuse are their candidates; rows where every rank is reused copy the last earlier
    row that is not fully reused; the rest ("partial" rows) depend on the row before them, so they
    are filled in rounds by chain depth (partial rows since the last reuse-free row), every row of
    one depth at once. Rows are addressed by flat index ``t * L + l``. When the chains are so deep
    that the rounds would be many and small (few columns, reuse near 1), :func:`_resolve_reuse_jacobi`
    is tried first.
    """
    T, L, K = cand.shape
    n_re = np.count_nonzero(reuse, axis=2)
    none = n_re == 0
    full = n_re == K
    partial = ~(none | full)
    out = cand.copy()
    if not (partial.any() or full.any()):
        return out
    t_idx = np.arange(T)[:, None]
    if partial.any():
        last_none = np.maximum.accumulate(np.where(none, t_idx, 0), axis=0)
        n_part = np.cumsum(partial, axis=0)
        depth = (n_part - np.take_along_axis(n_part, last_none, axis=0)).ravel()
        idx = np.flatnonzero(partial)
        d = depth[idx]
        rounds = int(d.max())
        if (rounds > _JACOBI_MIN_ROUNDS and rounds * _JACOBI_ROUND_ENTRIES > T * L * K
                and 4 * K <= int(cand.max()) + 1):  # with few experts most fresh draws collide
            got = _resolve_reuse_jacobi(cand, reuse)
            if got is not None:
                return got
        if rounds < np.iinfo(np.int16).max:
            d = d.astype(np.int16)  # a stable sort of 16-bit integers is a radix sort
        order = np.argsort(d, kind="stable")
        idx, d = idx[order], d[order]
    # flat index of the last row <= t (same layer) that is not fully reused (row 0 never reuses)
    src = (np.maximum.accumulate(np.where(full, 0, t_idx), axis=0) * L + np.arange(L)).ravel()
    rows_out = out.reshape(T * L, K)
    if partial.any():
        rows_cand = cand.reshape(T * L, K)
        rows_reuse = reuse.reshape(T * L, K)
        for part in np.split(idx, np.flatnonzero(np.diff(d)) + 1):
            prev = rows_out[src[part - L]]
            rows_out[part] = _fill_rows(prev, rows_reuse[part], rows_cand[part])
    f = np.flatnonzero(full)
    if f.size:
        rows_out[f] = rows_out[src[f]]
    return out


#: Deep reuse chains go to the Jacobi solver when there are more than this many rounds, the
#: rounds outnumber ``T * L * K / _JACOBI_ROUND_ENTRIES`` (a round costs a few numpy calls, a
#: Jacobi sweep a few passes over all entries) and there are at least 4K experts; a sweep cap
#: bounds the work lost if it does not settle (the rounds then do it). Speed only: both give the
#: same rows.
_JACOBI_MIN_ROUNDS = 64
_JACOBI_ROUND_ENTRIES = 1500
_JACOBI_MAX_SWEEPS = 32


def _resolve_reuse_jacobi(cand: np.ndarray, reuse: np.ndarray) -> np.ndarray | None:
    """:func:`_resolve_reuse` by fixed-point sweeps, or ``None`` if it has not settled after
    :data:`_JACOBI_MAX_SWEEPS` sweeps.

    Write ``fresh[t, k]`` for what rank k of row t takes when it is not reused; a reused rank
    holds ``fresh[s, k]`` of the last row ``s <= t`` where that rank was not reused (a gather, so a
    chain of copies of any length costs one step). Every sweep recomputes the fresh ranks of the
    rows whose previous row changed from the current guess of that previous row. Each row depends
    only on earlier rows, so the system has exactly one fixed point (the sequential answer); a
    sweep that changes nothing has reached it. Sweeps needed = the longest chain of rows whose
    fresh draws collide with a changed reused expert, short unless experts are few.
    """
    T, L, K = cand.shape
    m = reuse.reshape(T * L, K)
    c = cand.reshape(T * L, K)
    dep = m.any(axis=1)
    dep[:L] = False  # row 0 never reuses
    rows = np.flatnonzero(dep)
    t_idx = np.arange(T)[:, None, None]
    last = np.maximum.accumulate(np.where(reuse, 0, t_idx), axis=0)
    src = ((last * L + np.arange(L)[:, None]) * K + np.arange(K)).ravel()
    fresh = c.copy()
    slot = np.cumsum(~m[rows], axis=1)  # first guess: no collisions, fresh ranks take the candidates in order
    slot -= 1
    np.maximum(slot, 0, out=slot)
    fresh[rows] = np.take_along_axis(c[rows], slot, axis=1)
    out = fresh.ravel()[src].reshape(T * L, K)
    active = rows
    for _ in range(_JACOBI_MAX_SWEEPS):
        new = _fill_rows(out[active - L], m[active], c[active])
        moved = ((new != fresh[active]) & ~m[active]).any(axis=1)  # reused ranks of fresh are never read
        if not moved.any():
            return out.reshape(T, L, K)
        fresh[active[moved]] = new[moved]
        nxt = fresh.ravel()[src].reshape(T * L, K)
        changed = np.flatnonzero((nxt != out).any(axis=1)) + L
        out = nxt
        changed = changed[changed < T * L]
        active = changed[dep[changed]]
        if not active.size:
            return out.reshape(T, L, K)
    return None


# ----------------------------------------------------------------------------------------------
# fitted synthesis (issue 5, item 4): fit a real trace's statistics, generate any length from them

#: Identifies the fitted generative model below; bump it if generated values change for a profile.
FITTED_GENERATOR_VERSION = 1
#: Version of the profile dict written by :func:`fit_profile`.
PROFILE_VERSION = 1
_FIT_SOURCE = "moesim.traces.fit_profile"
_CALIBRATION_TOKENS = 8192
_CALIBRATION_ROUNDS = 4


def fit_profile(trace: Trace, *, calibrate: bool = True) -> dict:
    """Fit the routing statistics of ``trace`` into a JSON-able profile for
    :func:`synthesize_from_profile`.

    The profile holds, per layer column: ``popularity`` (share of the column's choices per expert,
    sums to 1), ``reuse_rate`` (fraction of rows t >= 1 sharing an expert with row t-1 at the column,
    the ``reuse_rate`` of :func:`moesim.traces.stats.basic_stats`), ``reuse_prob`` (the generator's
    per-rank probability of keeping the previous token's expert, or when negative the probability
    of avoiding it, see :func:`synthesize_from_profile`; calibrated so the generated
    ``reuse_rate`` matches, see below); per consecutive column pair: ``transitions[l]`` (E x E,
    ``P(expert b at column l+1 | expert a at column l)`` from the K*K choice pairs of every token;
    a row of an expert never chosen at l is the popularity of l+1) and ``predictability`` (as in
    :func:`moesim.traces.stats.trace_statistics`, for checking); gate weights: ``gate_mean`` /
    ``gate_std`` per rank (``None`` when the trace has no weights); shape: ``num_experts``,
    ``top_k``, ``layers``, ``model``; and ``source`` (the trace's ``meta.source``, ``sha256`` and
    ``tokens``). ``calibrate=False`` skips the calibration (``reuse_prob`` is then the closed-form
    first guess). Entries ``-1`` (no expert) are ignored.
    """
    from moesim.traces.stats import basic_stats, trace_statistics

    e = np.asarray(trace.experts).astype(np.int64)
    T, L, K = e.shape
    E = int(trace.num_experts)
    if T < 2 or E < 1:
        raise InputError("need a trace of at least 2 rows and 1 expert to fit", source=_FIT_SOURCE,
                         field="trace")
    base = basic_stats(trace)
    st = trace_statistics(trace, windows=(), capacities=[])
    pop = np.asarray(base["popularity"], dtype=np.float64)
    tot = pop.sum(axis=1, keepdims=True)
    pop = np.divide(pop, tot, out=np.full_like(pop, 1.0 / E), where=tot > 0)
    trans = []
    for l in range(L - 1):
        a = np.repeat(e[:, l, :], K, axis=1).ravel()
        b = np.tile(e[:, l + 1, :], (1, K)).ravel()
        v = (a >= 0) & (b >= 0)
        N = np.bincount(a[v] * E + b[v], minlength=E * E).reshape(E, E).astype(np.float64)
        rs = N.sum(axis=1, keepdims=True)
        P = np.where(rs > 0, N / np.maximum(rs, 1), pop[l + 1][None, :])
        trans.append(P.tolist())
    gate_mean = gate_std = None
    if trace.weights is not None:
        w = np.asarray(trace.weights, dtype=np.float64)
        ok = (e >= 0) & np.isfinite(w)
        gate_mean, gate_std = [], []
        for k in range(K):
            x = w[:, :, k][ok[:, :, k]]
            gate_mean.append(float(x.mean()) if x.size else None)
            gate_std.append(float(x.std()) if x.size else None)
        if any(v is None for v in gate_mean):
            gate_mean = gate_std = None
    meta = trace.meta or {}
    reuse_rate = [float(x) for x in base["reuse_rate"]]
    # closed-form first guess: rate = rho + (1 - rho) * chance, chance ~ overlap of two independent rows
    chance = [_chance_overlap(pop[l], K) for l in range(L)]
    rho = [float(np.clip((r - c) / max(1 - c, 1e-9), -1.0, 1.0)) for r, c in zip(reuse_rate, chance)]
    profile = {
        "profile_version": PROFILE_VERSION,
        "generator": "moesim.traces.synthetic.synthesize_from_profile",
        "generator_version": FITTED_GENERATOR_VERSION,
        "model": meta.get("model") or "",
        "num_experts": E,
        "top_k": int(K),
        "layers": list(trace.layers) if trace.layers is not None else list(range(L)),
        "source": {"source": meta.get("source"), "sha256": trace.sha256, "tokens": int(T),
                   "model": meta.get("model")},
        "popularity": pop.tolist(),
        "reuse_rate": reuse_rate,
        "reuse_prob": rho,
        "transitions": trans,
        "predictability": [tr["predictability"] for tr in st["transitions"]],
        "gate_mean": gate_mean,
        "gate_std": gate_std,
    }
    if calibrate:
        _calibrate_reuse(profile)
    return profile


def _chance_overlap(p: np.ndarray, K: int) -> float:
    """P(two independent rows of K draws from ``p`` share an expert), with-replacement approximation."""
    if K == 1:
        return float(np.sum(p * p))
    q = 1.0 - (1.0 - p) ** K  # P(expert in a row)
    return float(1.0 - np.prod(1.0 - q * q))


def _calibrate_reuse(profile: dict) -> None:
    """Adjust ``reuse_prob`` so the generated per-column reuse rate matches ``reuse_rate``: a few
    rounds of synthesising ``_CALIBRATION_TOKENS`` rows (fixed seed), measuring, and moving each
    column's ``reuse_prob`` by the error scaled by ``1 - chance``. Cross-layer transitions carry
    reuse from column l to l+1, which the closed-form guess ignores; this corrects for it."""
    from moesim.traces.stats import basic_stats

    target = np.asarray(profile["reuse_rate"])
    pop = np.asarray(profile["popularity"])
    K = profile["top_k"]
    chance = np.asarray([_chance_overlap(pop[l], K) for l in range(len(target))])
    rho = np.asarray(profile["reuse_prob"], dtype=np.float64)
    for _ in range(_CALIBRATION_ROUNDS):
        profile["reuse_prob"] = rho.tolist()
        got = np.asarray(basic_stats(synthesize_from_profile(profile, num_tokens=_CALIBRATION_TOKENS,
                                                             seed=12345))["reuse_rate"])
        rho = np.clip(rho + (target - got) / np.maximum(1 - chance, 1e-3), -1.0, 1.0)
    profile["reuse_prob"] = [float(x) for x in rho]


def _resolve_avoid(order: np.ndarray, avoid: np.ndarray, K: int) -> np.ndarray:
    """Rows ``[T, K]``: the first K experts of each row's race ``order`` ``[T, n]`` (its first
    ``n >= min(E, 2K)`` experts); rows t >= 1 with ``avoid[t]`` take the first K not chosen by
    row t-1 (then the rest, if fewer than K remain).

    Sequential in t; resolved by Jacobi sweeps (a row of chain depth d is final after d sweeps),
    each recomputing only the avoiding rows whose previous row changed in the last one."""
    T = order.shape[0]
    out = order[:, :K].copy()
    avoid = avoid.copy()
    avoid[0] = False
    rows = np.flatnonzero(avoid)
    for _ in range(T):
        if rows.size == 0:
            break
        sub = order[rows]
        prev = out[rows - 1]
        hit = sub == prev[:, :1]
        for k in range(1, K):
            hit |= sub == prev[:, k : k + 1]
        new = np.take_along_axis(sub, np.argsort(hit, axis=1, kind="stable")[:, :K], axis=1)
        moved = (new != out[rows]).any(axis=1)
        rows, new = rows[moved], new[moved]
        out[rows] = new
        nxt = rows + 1
        nxt = nxt[nxt < T]
        rows = nxt[avoid[nxt]]
    return out


def _first_in_order(key: np.ndarray, n: int) -> np.ndarray:
    """``np.argsort(key, axis=1, kind="stable")[:, :n]`` for ``key`` ``[R, E]``, without sorting
    whole rows: where a row's n+1 smallest keys are distinct, its first n are unique and found by
    ``argpartition``; rows with ties (or NaN) among them are sorted in full."""
    R, E = key.shape
    if n >= E:
        return np.argsort(key, axis=1, kind="stable")
    part = np.argpartition(key, n, axis=1)[:, : n + 1]
    vals = np.take_along_axis(key, part, axis=1)
    order = np.argsort(vals, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    out = np.take_along_axis(part, order[:, :n], axis=1)
    bad = np.flatnonzero(~(vals[:, 1:] > vals[:, :-1]).all(axis=1))
    if bad.size:
        out[bad] = np.argsort(key[bad], axis=1, kind="stable")[:, :n]
    return out


def _check_profile(profile: dict) -> tuple:
    def bad(field, msg):
        return InputError(msg, source="moesim.traces.synthesize_from_profile", field=field)

    try:
        E, K = int(profile["num_experts"]), int(profile["top_k"])
        layers = [int(x) for x in profile["layers"]]
        pop = np.asarray(profile["popularity"], dtype=np.float64)
        rho = np.asarray(profile["reuse_prob"], dtype=np.float64)
        trans = np.asarray(profile["transitions"], dtype=np.float64).reshape(-1, E, E)
    except (KeyError, TypeError, ValueError) as exc:
        raise bad("profile", f"not a trace profile from fit_profile: {exc}") from None
    L = len(layers)
    if not 1 <= K <= E:
        raise bad("top_k", f"expected 1 <= top_k <= num_experts={E}, got {K}")
    if pop.shape != (L, E) or (pop < 0).any() or not np.allclose(pop.sum(axis=1), 1, atol=1e-6):
        raise bad("popularity", f"expected {L} rows of {E} probabilities summing to 1")
    if rho.shape != (L,) or (rho < -1).any() or (rho > 1).any():
        raise bad("reuse_prob", f"expected {L} numbers in [-1, 1]")
    if trans.shape != (L - 1, E, E) or (trans < 0).any() or not np.allclose(trans.sum(axis=2), 1, atol=1e-6):
        raise bad("transitions", f"expected {L - 1} row-stochastic {E}x{E} matrices")
    return E, K, layers, pop, rho, trans


def synthesize_from_profile(profile: dict, *, num_tokens: int, seed: int = 0, model_name: str | None = None) -> Trace:
    """A synthetic trace of ``num_tokens`` rows reproducing a :func:`fit_profile` profile.

    Generative model, per token t (rows are one token sequence, no request structure):

    * column 0: each rank keeps token t-1's expert at (column 0, rank) with probability
      ``reuse_prob[0]`` when it is >= 0 (a negative value ``-a`` instead means: with probability
      ``a`` the token's fresh draw avoids token t-1's experts, for columns whose measured reuse is
      below what chance and the cross-layer transitions give); the other ranks are drawn without replacement from ``popularity[0]``
      (exponential races), skipping experts already kept;
    * column l >= 1: the same reuse step with ``reuse_prob[l]``; fresh ranks are drawn without
      replacement from the mixture ``mean over token t's experts a at column l-1 of
      transitions[l-1][a, :]`` (so the stationary marginal is ``popularity[l]`` for top-1, and the
      cross-layer joint follows the fitted matrix);
    * gate weights (float16): with ``gate_mean``/``gate_std`` per rank, normal draws clipped to
      [1e-3, 1], sorted decreasing and normalised to sum 1; without them, the softmax of sorted
      standard-normal logits of :func:`synthesize`.

    Not captured: request/prompt boundaries and prefill/decode phases; correlations longer than
    one token (beyond what the one-step reuse chain induces) or across more than one layer; the
    dependence of reuse on the cross-layer path (reuse and transitions are independent choices, so
    reuse dilutes the transition dependence slightly); rank-specific popularity for top-K > 1
    (sampling without replacement flattens the marginals a little); the real gate-weight law and
    its correlation with which expert is chosen. Deterministic in ``seed``.
    """
    E, K, layers, pop, rho, trans = _check_profile(profile)
    if not isinstance(num_tokens, (int, np.integer)) or isinstance(num_tokens, bool) or num_tokens < 1:
        raise _bad("num_tokens", f"expected an integer >= 1, got {num_tokens!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise _bad("seed", f"expected an integer >= 0, got {seed!r}")
    T, L = int(num_tokens), len(layers)
    s_pick, s_reuse, s_gate = np.random.SeedSequence(seed).spawn(3)
    rng_pick = np.random.default_rng(s_pick)
    rng_reuse = np.random.default_rng(s_reuse)
    rng_gate = np.random.default_rng(s_gate)
    experts = np.empty((T, L, K), dtype=np.int32)
    for l in range(L):
        if l == 0:
            w = np.broadcast_to(pop[0], (T, E))
        else:
            # mean over token t's experts at column l-1 of their transition rows, summed rank by
            # rank (the order, hence the rounding, of numpy's mean over that axis) without a
            # [T, K, E] temporary
            tl, prev = trans[l - 1], experts[:, l - 1, :]
            w = tl[prev[:, 0]]
            for k in range(1, K):
                w += tl[prev[:, k]]
            w /= K
        key = rng_pick.standard_exponential(size=(T, E))
        pos = w > 0
        np.divide(key, w, out=key, where=pos)
        key[~pos] = np.inf
        u = rng_reuse.random((T, K))
        if rho[l] >= 0:
            cand = np.argsort(key, axis=1, kind="stable") if K == E else _top_k_rows_reference(key, K)
            reuse = u < rho[l]
            reuse[0] = False
            experts[:, l, :] = _resolve_reuse(cand[:, None, :].astype(np.int32), reuse[:, None, :])[:, 0, :]
        else:
            # a row avoiding the previous row's K experts takes its first K others, all among its
            # first 2K by race order
            order = _first_in_order(key, min(E, 2 * K))
            experts[:, l, :] = _resolve_avoid(order, u[:, 0] < -rho[l], K)
    gm, gs = profile.get("gate_mean"), profile.get("gate_std")
    if gm is not None and gs is not None and len(gm) == K:
        z = rng_gate.standard_normal((T, L, K)) * np.asarray(gs) + np.asarray(gm)
        z = -np.sort(-np.clip(z, 1e-3, 1.0), axis=2)
        z /= z.sum(axis=2, keepdims=True)
    else:
        z = rng_gate.standard_normal((T, L, K), dtype=np.float32)
        z = -np.sort(-z, axis=2)
        z -= z[:, :, :1]
        np.exp(z, out=z)
        z /= z.sum(axis=2, keepdims=True)
    weights = z.astype(np.float16)
    src = profile.get("source") or {}
    name = profile.get("model", "") if model_name is None else model_name
    sha = (src.get("sha256") or "")[:16]
    meta = {
        "format_version": FORMAT_VERSION,
        "model": name,
        "num_experts": E,
        "top_k": K,
        "layers": list(layers),
        "source": (
            f"synthetic, fitted: moesim.traces.synthetic.synthesize_from_profile (tokens={T}, seed={int(seed)}) "
            f"from a profile of trace sha256 {sha or '?'}... ({src.get('source') or 'unknown source'})"
        ),
        "licence": "Apache-2.0 (generated by moesim; statistics fitted to the source trace named in 'source')",
        "captured_with": (
            f"moesim.traces.synthetic.synthesize_from_profile, fitted generator v{FITTED_GENERATOR_VERSION}: "
            "per-layer popularity, per-rank temporal reuse, first-order cross-layer transition matrices, "
            "simple gate-weight model"
        ),
        "synthetic": {"tokens": T, "seed": int(seed), "generator_version": FITTED_GENERATOR_VERSION,
                      "profile_source": src},
    }
    dtype = np.int16 if E <= np.iinfo(np.int16).max else np.int32
    return Trace(experts=experts.astype(dtype, copy=False), weights=weights, meta=meta)


# ----------------------------------------------------------------------------------------------
# synthesis from published statistics (issue 5, item 4): for models no trace here covers

#: Identifies the published-statistics generator below; bump it if generated values change.
PUBLISHED_GENERATOR_VERSION = 1
_PUB_SOURCE = "moesim.traces.synthesize_published"

_JIANG2024 = (
    'Jiang et al. 2024, "Mixtral of Experts", arXiv:2401.04088v1, section 5 "Routing analysis", '
    "Table 5 (page 8): percentage of expert assignment repetitions"
)

#: Routing statistics that papers publish, by name (``--published NAME[:SUBSET]``). Each entry
#: gives the model shape they were measured on, the model layers they were measured at and, per
#: data subset, the percentages exactly as printed: ``first`` = consecutive tokens i, i+1 whose
#: first-choice expert is the same; ``first_or_second`` = consecutive tokens sharing an expert as
#: first or second choice (the two top-2 sets overlap).
PUBLISHED_STATS: dict[str, dict] = {
    "mixtral-8x7b": {
        "model": "mixtral-8x7b",
        "num_layers": 32,
        "num_experts": 8,
        "top_k": 2,
        "layers": [0, 15, 31],
        "citation": _JIANG2024,
        "measured_on": "The Pile validation subsets, Mixtral-8x7B",
        "chance": {"first": 12.5, "first_or_second": 46.4},
        "subsets": {
            "arxiv": {"name": "ArXiv", "first": [14.0, 27.9, 22.7], "first_or_second": [46.5, 62.3, 52.9]},
            "dm-mathematics": {"name": "DM Mathematics", "first": [14.1, 28.4, 19.7],
                               "first_or_second": [44.9, 67.0, 44.5]},
            "github": {"name": "Github", "first": [14.9, 28.1, 19.7], "first_or_second": [49.9, 66.9, 49.2]},
            "gutenberg": {"name": "Gutenberg", "first": [13.9, 26.1, 26.3], "first_or_second": [49.5, 63.1, 52.2]},
            "philpapers": {"name": "PhilPapers", "first": [13.6, 25.3, 22.1], "first_or_second": [46.9, 61.9, 51.3]},
            "pubmed-abstracts": {"name": "PubMed Abstracts", "first": [14.2, 24.6, 22.0],
                                 "first_or_second": [48.6, 61.6, 51.8]},
            "stackexchange": {"name": "StackExchange", "first": [13.6, 27.2, 23.6],
                              "first_or_second": [48.2, 64.6, 53.6]},
            "wikipedia-en": {"name": "Wikipedia (en)", "first": [14.4, 23.6, 25.3],
                             "first_or_second": [49.8, 62.1, 51.8]},
        },
    },
}
#: Subset used when none is named: the unweighted mean over all subsets of the source.
DEFAULT_SUBSET = "mean"


def _pub_bad(field: str, msg: str) -> InputError:
    return InputError(msg, source=_PUB_SOURCE, field=field)


def parse_published(spec: str) -> tuple[str, str]:
    """``"NAME"`` or ``"NAME:SUBSET"`` -> ``(NAME, SUBSET)`` (SUBSET defaults to ``"mean"``), checked
    against :data:`PUBLISHED_STATS`."""
    if not isinstance(spec, str) or not spec.strip():
        raise _pub_bad("published", f"expected NAME or NAME:SUBSET, got {spec!r}")
    name, _, subset = spec.strip().partition(":")
    name, subset = name.strip().lower(), (subset.strip().lower() or DEFAULT_SUBSET)
    if name not in PUBLISHED_STATS:
        raise _pub_bad("published", f"unknown published statistics {name!r}; known: {', '.join(sorted(PUBLISHED_STATS))}")
    subs = PUBLISHED_STATS[name]["subsets"]
    if subset != DEFAULT_SUBSET and subset not in subs:
        raise _pub_bad("published", f"unknown subset {subset!r} of {name}; known: {DEFAULT_SUBSET}, {', '.join(subs)}")
    return name, subset


def published_targets(spec: str, *, layers=None, num_layers: int | None = None) -> dict:
    """Per-layer targets from published statistics ``spec`` (``NAME[:SUBSET]``) for the model
    ``layers`` (default: every layer of the source model) of a model of ``num_layers`` blocks
    (default: the source model's).

    The published layers are placed at relative depth ``layer / (source num_layers - 1)``; a
    target layer at relative depth ``layer / (num_layers - 1)`` takes the values interpolated
    linearly between the two nearest published depths (so the published layers themselves get
    the published values; for another depth of model the figures are transferred by relative
    depth, an assumption). Returns fractions (not percent): ``first_repeat`` and ``set_overlap``
    per layer, plus ``depth``, ``published_layers``, ``published`` (the figures used, percent).
    """
    name, subset = parse_published(spec)
    src = PUBLISHED_STATS[name]
    n_src = int(src["num_layers"])
    n = n_src if num_layers is None else num_layers
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise _pub_bad("num_layers", f"expected an integer >= 1, got {num_layers!r}")
    ls = list(range(n)) if layers is None else [int(x) for x in layers]
    if not ls or any(x < 0 or x >= n for x in ls) or any(b <= a for a, b in zip(ls, ls[1:])):
        raise _pub_bad("layers", f"expected strictly increasing layer indices in [0, {n}), got {ls!r}")
    subs = src["subsets"]
    if subset == DEFAULT_SUBSET:
        first = np.mean([s["first"] for s in subs.values()], axis=0)
        both = np.mean([s["first_or_second"] for s in subs.values()], axis=0)
    else:
        first, both = np.asarray(subs[subset]["first"], float), np.asarray(subs[subset]["first_or_second"], float)
    x_pub = np.asarray(src["layers"], float) / max(n_src - 1, 1)
    depth = np.asarray(ls, float) / max(n - 1, 1)
    return {
        "name": name,
        "subset": subset,
        "layers": ls,
        "num_layers": int(n),
        "depth": depth.tolist(),
        "published_layers": list(src["layers"]),
        "published": {"first": [round(float(v), 6) for v in first],
                      "first_or_second": [round(float(v), 6) for v in both]},
        "first_repeat": (np.interp(depth, x_pub, first) / 100.0).tolist(),
        "set_overlap": (np.interp(depth, x_pub, both) / 100.0).tolist(),
    }


def _overlap_constants(E: int, K: int) -> tuple[float, float, float]:
    """For the generator of :func:`synthesize_published` (uniform popularity, E experts, top-K):
    ``p_in`` = P(a non-repeated first choice is one of the previous row's other K-1 experts),
    ``c0`` = P(K-1 uniform draws from the E-1 experts other than the first choice hit the previous
    row's K experts), ``h_avoid`` = that probability when the draws avoid the previous row (0 when
    E-1-K >= K-1 experts remain to draw from, else 1)."""
    if K <= 1 or K >= E:
        return 1.0, 1.0, 1.0
    p_in = (K - 1) / (E - 1)
    c0 = 1.0 - math.comb(E - 1 - K, K - 1) / math.comb(E - 1, K - 1)
    h_avoid = 0.0 if E - 1 - K >= K - 1 else 1.0
    return p_in, c0, h_avoid


def expected_published_rates(repeat_first, overlap_adjust, num_experts: int, top_k: int) -> tuple[list, list]:
    """Closed-form stationary rates of :func:`synthesize_published`'s generator: per layer, the
    first-choice repeat rate (``repeat_first`` itself) and the set-overlap rate
    ``a + (1-a) * (p_in + (1-p_in) * h)``, ``h = q + (1-q) c0`` (q >= 0) or
    ``(1+q) c0 - q h_avoid`` (q < 0), constants from :func:`_overlap_constants`."""
    p_in, c0, h_avoid = _overlap_constants(int(num_experts), int(top_k))
    a = np.asarray(repeat_first, float)
    q = np.asarray(overlap_adjust, float)
    h = np.where(q >= 0, q + (1 - q) * c0, (1 + q) * c0 - q * h_avoid)
    s = a + (1 - a) * (p_in + (1 - p_in) * h) if top_k > 1 else a
    return a.tolist(), np.asarray(s, float).tolist()


def fit_published(spec: str, *, layers=None, num_layers: int | None = None, num_experts: int | None = None,
                  top_k: int | None = None) -> dict:
    """Fit :func:`synthesize_published`'s per-layer parameters to published statistics ``spec``
    (``NAME[:SUBSET]``; see :func:`published_targets` for ``layers`` / ``num_layers``).

    Two parameters per layer, solved in closed form so that the generator's expected rates equal
    the targets: ``repeat_first`` (probability that token t keeps token t-1's first-choice expert;
    otherwise its first choice is uniform over the other experts, so the first-choice repeat rate
    equals it exactly) and ``overlap_adjust`` q in [-1, 1] (q > 0: with probability q the other
    ranks are taken first from token t-1's experts; q < 0: with probability -q they avoid them;
    sets the first-or-second-choice overlap rate). Targets out of the generator's reach are clipped
    and listed in ``clipped``. ``num_experts`` / ``top_k`` must equal the shape the statistics were
    measured on (the rates are meaningless for another shape).
    """
    tg = published_targets(spec, layers=layers, num_layers=num_layers)
    src = PUBLISHED_STATS[tg["name"]]
    E = int(src["num_experts"] if num_experts is None else num_experts)
    K = int(src["top_k"] if top_k is None else top_k)
    if (E, K) != (int(src["num_experts"]), int(src["top_k"])):
        raise _pub_bad(
            "published",
            f"{tg['name']}'s statistics were measured with top-{src['top_k']} of {src['num_experts']} experts; "
            f"they do not transfer to top-{K} of {E}",
        )
    p_in, c0, h_avoid = _overlap_constants(E, K)
    a = np.clip(np.asarray(tg["first_repeat"], float), 0.0, 1.0)
    s = np.asarray(tg["set_overlap"], float)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.where(a < 1, (s - a) / (1 - a), 1.0)
        h = (x - p_in) / (1 - p_in)
        q = np.where(h >= c0, (h - c0) / (1 - c0), -(c0 - h) / max(c0 - h_avoid, 1e-12))
    q = np.nan_to_num(q)
    clipped = [tg["layers"][i] for i in np.flatnonzero((q < -1) | (q > 1))]
    q = np.clip(q, -1.0, 1.0)
    exp_first, exp_overlap = expected_published_rates(a, q, E, K)
    return {
        "generator": "moesim.traces.synthetic.synthesize_published",
        "generator_version": PUBLISHED_GENERATOR_VERSION,
        "published": tg["name"],
        "subset": tg["subset"],
        "citation": src["citation"],
        "measured_on": src["measured_on"],
        "source_model": src["model"],
        "source_num_layers": int(src["num_layers"]),
        "num_experts": E,
        "top_k": K,
        "num_layers": tg["num_layers"],
        "layers": tg["layers"],
        "published_layers": tg["published_layers"],
        "published_figures_percent": tg["published"],
        "targets": {"first_repeat": tg["first_repeat"], "set_overlap": tg["set_overlap"]},
        "repeat_first": [float(v) for v in a],
        "overlap_adjust": [float(v) for v in q],
        "expected": {"first_repeat": exp_first, "set_overlap": exp_overlap},
        "clipped": clipped,
    }


def synthesize_published(
    spec: str,
    *,
    num_tokens: int,
    seed: int = 0,
    layers=None,
    num_layers: int | None = None,
    num_experts: int | None = None,
    top_k: int | None = None,
    model_name: str | None = None,
) -> Trace:
    """A synthetic trace of ``num_tokens`` rows reproducing published routing statistics ``spec``
    (``"mixtral-8x7b"`` or ``"mixtral-8x7b:SUBSET"``, see :data:`PUBLISHED_STATS`): per layer, the
    share of consecutive tokens keeping their first-choice expert and the share sharing an expert
    as first or second choice, at the published layers and interpolated between them
    (:func:`published_targets`, :func:`fit_published`).

    Generative model per layer column (rows are one token sequence): experts have uniform
    popularity; token 0 draws K distinct experts uniformly; token t keeps token t-1's first choice
    with probability ``repeat_first``, else its first choice is uniform over the other E-1 experts
    (a cumulative sum mod E, vectorised); ranks 1..K-1 are drawn uniformly without replacement
    from the experts other than the first choice, except that with probability ``|q|``
    (``q = overlap_adjust``) they take token t-1's experts first (q > 0) or avoid them (q < 0).
    Every step is symmetric in the expert ids, so each expert's long-run share is 1/E. Gate
    weights: the softmax of sorted standard-normal logits, as in :func:`synthesize`.

    Not captured: anything the paper does not publish: per-expert popularity skew (uniform here;
    Mixtral's Figure 7 shows shares near 1/8 with some spread), correlations across layers (layer
    columns are independent), longer-range or request structure, the dependence on the text
    (pick a subset, or the mean of all), the real gate weights. Layers between the published ones
    are linear interpolations, and another model's layers are mapped by relative depth. Ranks
    1..K-1 are resolved token by token (a Python loop over rows, vectorised over layers: about
    0.1 s per 10,000 rows). Deterministic in ``seed``.
    """
    if not isinstance(num_tokens, (int, np.integer)) or isinstance(num_tokens, bool) or num_tokens < 1:
        raise _pub_bad("num_tokens", f"expected an integer >= 1, got {num_tokens!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise _pub_bad("seed", f"expected an integer >= 0, got {seed!r}")
    fit = fit_published(spec, layers=layers, num_layers=num_layers, num_experts=num_experts, top_k=top_k)
    T, L, E, K = int(num_tokens), len(fit["layers"]), fit["num_experts"], fit["top_k"]
    a = np.asarray(fit["repeat_first"], float)
    q = np.asarray(fit["overlap_adjust"], float)
    s_first, s_rest, s_gate = np.random.SeedSequence(seed).spawn(3)
    rng_first = np.random.default_rng(s_first)
    rng_rest = np.random.default_rng(s_rest)
    rng_gate = np.random.default_rng(s_gate)

    # first choice: a Markov chain per column, r_t = r_{t-1} + d_t mod E, d_t = 0 on a repeat
    start = rng_first.integers(0, E, size=L)
    rep = rng_first.random((T, L)) < a[None, :]
    step = 1 + rng_first.integers(0, max(E - 1, 1), size=(T, L))
    d = np.where(rep, 0, step)
    d[0] = start
    first = np.cumsum(d, axis=0) % E
    experts = np.empty((T, L, K), dtype=np.int64)
    experts[:, :, 0] = first
    if K > 1:
        u = rng_rest.random((T, L))
        mode = np.where(u < np.abs(q)[None, :], np.sign(q)[None, :], 0.0)  # +1 prefer, -1 avoid, 0 plain
        mode[0] = 0.0
        eye = np.eye(E, dtype=bool)
        prev_in = np.zeros((L, E), dtype=bool)
        cols = np.arange(L)[:, None]
        chunk = max(1, _CHUNK_ENTRIES // (L * E))
        for c0 in range(0, T, chunk):
            keys_chunk = rng_rest.random((min(T, c0 + chunk) - c0, L, E))
            for i in range(keys_chunk.shape[0]):
                t = c0 + i
                score = keys_chunk[i] - mode[t][:, None] * prev_in  # prefer: -1 on P; avoid: +1 on P
                score[eye[first[t]]] = np.inf
                if K - 1 == 1:
                    rest = np.argmin(score, axis=1)[:, None]
                else:
                    part = np.argpartition(score, K - 2, axis=1)[:, : K - 1]
                    rest = np.take_along_axis(part, np.argsort(np.take_along_axis(score, part, axis=1), axis=1), axis=1)
                experts[t, :, 1:] = rest
                prev_in = np.zeros((L, E), dtype=bool)
                prev_in[cols, experts[t]] = True

    z = rng_gate.standard_normal((T, L, K), dtype=np.float32)
    z = -np.sort(-z, axis=2)
    z -= z[:, :, :1]
    np.exp(z, out=z)
    z /= z.sum(axis=2, keepdims=True)
    weights = z.astype(np.float16)

    name = fit["source_model"] if model_name is None else model_name
    sub = "mean of all subsets" if fit["subset"] == DEFAULT_SUBSET else f"subset {fit['subset']}"
    transfer = ""
    if fit["num_layers"] != fit["source_num_layers"] or (name and name != fit["source_model"]):
        transfer = (f"; TRANSFERRED to a {fit['num_layers']}-block model by relative depth (the statistics "
                    f"were measured on {fit['source_model']}, not on this model)")
    meta = {
        "format_version": FORMAT_VERSION,
        "model": name,
        "num_experts": E,
        "top_k": K,
        "layers": list(fit["layers"]),
        "source": (
            f"synthetic, from published statistics: moesim.traces.synthetic.synthesize_published "
            f"(published={fit['published']}:{fit['subset']}, tokens={T}, seed={int(seed)}) fitted to "
            f"{fit['citation']} ({fit['measured_on']}; {sub}): consecutive-token same-expert rates "
            f"(first choice; first or second choice) at layers "
            f"{', '.join(str(x) for x in fit['published_layers'])}, other layers interpolated linearly"
            f"{transfer}"
        ),
        "licence": "Apache-2.0 (generated by moesim; no third-party data, only published summary figures)",
        "captured_with": (
            f"moesim.traces.synthetic.synthesize_published, generator v{PUBLISHED_GENERATOR_VERSION}: uniform "
            "popularity, per-layer first-choice repeat probability and signed overlap adjustment of the "
            "other ranks, fitted in closed form; softmax gate weights; layers independent"
        ),
        "synthetic": {"tokens": T, "seed": int(seed), "generator_version": PUBLISHED_GENERATOR_VERSION,
                      "fit": fit},
    }
    dtype = np.int16 if E <= np.iinfo(np.int16).max else np.int32
    return Trace(experts=experts.astype(dtype), weights=weights, meta=meta)
