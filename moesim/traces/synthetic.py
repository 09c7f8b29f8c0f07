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
``Generator`` streams stable. Work is vectorised over tokens and layers; the reuse chain is
resolved in rounds of equal chain depth rather than token by token.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

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

    def resolved_seed(self, scenario_seed: int) -> int:
        """``seed`` if set, else one derived from the scenario seed (see :func:`derived_seed`)."""
        return self.seed if self.seed is not None else derived_seed(scenario_seed)

    def make(self, *, layers, num_experts: int, top_k: int, scenario_seed: int = 0, model_name: str = "") -> Trace:
        """Synthesise the trace this block describes for a model's MoE ``layers``."""
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
    """
    L, E = logw.shape
    inv_w = np.exp(-logw).astype(np.float32)
    out = np.empty((T, L, K), dtype=np.int32)
    rows = max(1, _CHUNK_ENTRIES // (L * E))
    for a in range(0, T, rows):
        b = min(T, a + rows)
        key = rng.standard_exponential(size=(b - a, L, E), dtype=np.float32)
        key *= inv_w
        if K == E:
            idx = np.argsort(key, axis=2, kind="stable")
        else:
            part = np.argpartition(key, K - 1, axis=2)[:, :, :K]
            order = np.argsort(np.take_along_axis(key, part, axis=2), axis=2, kind="stable")
            idx = np.take_along_axis(part, order, axis=2)
        out[a:b] = idx
    return out


def _fill_rows(prev: np.ndarray, m: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Rows ``[n, K]``: reused ranks (``m``) take ``prev``; the other ranks take, in order, the
    candidates ``c`` that are not among the reused experts."""
    reused = np.where(m, prev, -1)
    taken = (c[:, :, None] == reused[:, None, :]).any(axis=2)
    avail = np.take_along_axis(c, np.argsort(taken, axis=1, kind="stable"), axis=1)
    slot = np.maximum(np.cumsum(~m, axis=1) - 1, 0)
    return np.where(m, prev, np.take_along_axis(avail, slot, axis=1))


def _resolve_reuse(cand: np.ndarray, reuse: np.ndarray) -> np.ndarray:
    """Apply per-rank reuse of the previous token's experts to fresh candidates ``cand``.

    Rows with no reuse are their candidates; rows where every rank is reused copy the last earlier
    row that is not fully reused; the rest ("partial" rows) depend on the row before them, so they
    are filled in rounds by chain depth (partial rows since the last reuse-free row), every row of
    one depth at once.
    """
    T, L, K = cand.shape
    n_re = reuse.sum(axis=2)
    none = n_re == 0
    full = n_re == K
    partial = ~none & ~full
    t_idx = np.arange(T)[:, None]
    # last row <= t that is not fully reused (row 0 never reuses)
    src = np.maximum.accumulate(np.where(full, 0, t_idx), axis=0)
    out = np.empty_like(cand)
    out[none] = cand[none]
    if partial.any():
        last_none = np.maximum.accumulate(np.where(none, t_idx, 0), axis=0)
        n_part = np.cumsum(partial, axis=0)
        depth = n_part - np.take_along_axis(n_part, last_none, axis=0)
        ts, ls = np.nonzero(partial)
        d = depth[ts, ls]
        order = np.argsort(d, kind="stable")
        ts, ls, d = ts[order], ls[order], d[order]
        bounds = np.flatnonzero(np.diff(d)) + 1
        for tt, ll in zip(np.split(ts, bounds), np.split(ls, bounds)):
            prev = out[src[tt - 1, ll], ll]
            out[tt, ll] = _fill_rows(prev, reuse[tt, ll], cand[tt, ll])
    tf, lf = np.nonzero(full)
    if tf.size:
        out[tf, lf] = out[src[tf, lf], lf]
    return out
