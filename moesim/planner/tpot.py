"""``moesim search-tpot``: the most throughput per GPU (or per dollar) an expert-parallel deployment
gives under a TPOT limit, co-located or with attention-FFN disaggregation (the figure of merit of
MegaScale-Infer, Zhu et al. 2025, arXiv:2504.02263, and of Step-3's AFD analysis).

The space: the sequences per attention rank (``workload.batch_size``) from a list, times the
attention pool's size (``parallel.attention_gpus``: ``None`` = co-located, every GPU runs attention
and experts) from a list. Each point is a fixed-batch decode run of the expert-parallel engine
(``steps`` decode steps at ``workload.context_tokens``; a serving block, batching policy or
elastic scaling of the base scenario is dropped; a batch smaller than ``parallel.micro_batches``
runs as that many micro-batches of one sequence). A point is *feasible* when it fits in memory and
its TPOT statistic (``mean``, ``p50``, ``p90`` or ``p99`` of the step times) is at most the limit;
the objective is ``expert_parallel.efficiency.tokens_per_s_per_gpu`` (``per_gpu``) or
``tokens_per_dollar`` (``per_dollar``, needs ``parallel.gpu_cost_per_hour``).

Two methods:

* ``exhaustive``: every point runs; the best feasible point is the optimum of the space.
* ``bisect``: for each attention split, a binary search over the sorted batch list for the largest
  batch that is feasible, assuming that TPOT and memory grow with the batch (more tokens per step
  never make a step shorter) and that throughput per GPU grows with it too, so the largest
  feasible batch is the best of its split; about ``log2(len(batches))`` runs per split. Where the
  assumptions hold (the tests check that they do on a small space) it finds the exhaustive
  optimum; where they do not, it may not.

The report lists the chosen point, every evaluated point, and the frontier: the evaluated points
that fit in memory and that no other point beats on both TPOT (lower) and the objective (higher).
Ties in the objective go to the lower TPOT, then to the earlier point (split order, then batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moesim.errors import InputError

STATS = ("mean", "p50", "p90", "p99")
OBJECTIVES = {"per_gpu": "tokens_per_s_per_gpu", "per_dollar": "tokens_per_dollar"}


@dataclass
class TpotPoint:
    """One evaluated (attention split, batch) point."""

    attention_gpus: int | None
    batch: int
    fits: bool
    tpot_ms: float | None = None
    objective: float | None = None
    throughput_tok_s: float | None = None
    tokens_per_s_per_gpu: float | None = None
    tokens_per_dollar: float | None = None
    reason: str = ""
    feasible: bool = False

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class TpotSearch:
    """Outcome of a search: the chosen point (None when nothing is feasible), every point run, the
    frontier, and the settings."""

    best: TpotPoint | None
    points: list
    frontier: list
    settings: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"settings": self.settings, "best": self.best.as_dict() if self.best else None,
                "points": [p.as_dict() for p in self.points], "frontier": [p.as_dict() for p in self.frontier]}


def _key(p: TpotPoint, order: dict):
    """Sort key of a feasible point, best first."""
    return (-p.objective, p.tpot_ms, order[(p.attention_gpus, p.batch)])


class _Evaluator:
    """Runs points of the space (each at most once) against one base scenario."""

    def __init__(self, base, sets, *, tpot_ms, stat, objective, steps, seed, progress):
        from moesim.config.loader import load_scenario

        self.base, self.sets, self.seed = str(base), list(sets), seed
        self.limit, self.stat, self.obj, self.steps = tpot_ms, stat, objective, steps
        self.progress = progress
        self.sc0 = load_scenario(base, self.sets + self._drop(), seed=seed)
        if self.sc0.cluster is None:
            raise InputError("search-tpot needs a multi-GPU scenario (a cluster: block)", source=self.base,
                             field="cluster")
        if objective == "per_dollar" and self.sc0.parallel.gpu_cost_per_hour is None:
            raise InputError("per_dollar needs GPU prices: set parallel.gpu_cost_per_hour", source=self.base,
                             field="parallel.gpu_cost_per_hour")
        self.cache: dict = {}
        self.G = self.sc0.cluster.nodes * self.sc0.cluster.gpus_per_node

    @staticmethod
    def _drop() -> list:
        """Overrides that turn the base into a fixed-batch decode run."""
        return ["workload.requests=null", "policies.batching=null", "parallel.elastic=null",
                "parallel.prefill_gpus=null"]

    def __call__(self, a: int | None, b: int) -> TpotPoint:
        if (a, b) in self.cache:
            return self.cache[(a, b)]
        from moesim.config.loader import load_scenario
        from moesim.engine.run import simulate

        t = self.sc0.parallel.attention_tp
        ranks = (a or self.G) // t
        sets = self.sets + self._drop() + [
            f"parallel.attention_gpus={'null' if a is None else a}", f"workload.batch_size={b}",
            f"workload.max_tokens={ranks * b * self.steps}", "workload.warmup_tokens=0", "workload.loop_trace=true",
            f"parallel.micro_batches={min(self.sc0.parallel.micro_batches, b)}"]  # b < micro-batches: b of them
        p = TpotPoint(attention_gpus=a, batch=b, fits=False)
        try:
            sc = load_scenario(self.base, sets, seed=self.seed)
            s = simulate(sc, source=self.base).summary
        except InputError as e:
            p.reason = e.message
        else:
            eff = s["expert_parallel"]["efficiency"]
            p.fits = True
            p.tpot_ms = float(s["tpot_ms"][self.stat])
            p.throughput_tok_s = float(s["throughput_tok_s"])
            p.tokens_per_s_per_gpu = float(eff["tokens_per_s_per_gpu"])
            p.tokens_per_dollar = eff.get("tokens_per_dollar")
            p.objective = float(eff[OBJECTIVES[self.obj]])
            p.feasible = p.tpot_ms <= self.limit
            if not p.feasible:
                p.reason = f"TPOT {self.stat} {p.tpot_ms:.3f} ms > {self.limit:g} ms"
        self.cache[(a, b)] = p
        if self.progress is not None:
            state = "ok" if p.feasible else ("over limit" if p.fits else "does not fit")
            tp = "-" if p.tpot_ms is None else f"{p.tpot_ms:.2f} ms"
            self.progress(f"attention_gpus={a} batch={b}: {tp}, {state}")
        return p


def frontier(points: list) -> list:
    """Points that fit and that no other fitting point beats on both TPOT (<=) and objective (>=,
    one of them strictly); sorted by TPOT."""
    fit = [p for p in points if p.fits]
    out = []
    for p in fit:
        dominated = any(q is not p and q.tpot_ms <= p.tpot_ms and q.objective >= p.objective
                        and (q.tpot_ms < p.tpot_ms or q.objective > p.objective) for q in fit)
        if not dominated:
            out.append(p)
    return sorted(out, key=lambda p: (p.tpot_ms, -p.objective))


def search_tpot(base, *, tpot_ms: float, batches, attention_gpus=(None,), sets=(), stat: str = "mean",
                objective: str = "per_gpu", method: str = "bisect", steps: int = 4, seed=None,
                progress=None) -> TpotSearch:
    """Search the space for the best feasible point; see the module docstring."""
    src = "moesim search-tpot"
    if stat not in STATS:
        raise InputError(f"unknown TPOT statistic {stat!r}; valid: {', '.join(STATS)}", source=src, field="--stat")
    if objective not in OBJECTIVES:
        raise InputError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}", source=src,
                         field="--objective")
    if method not in ("bisect", "exhaustive"):
        raise InputError(f"unknown method {method!r}; valid: bisect, exhaustive", source=src, field="--method")
    if not tpot_ms > 0:
        raise InputError("the TPOT limit must be positive", source=src, field="--tpot-ms")
    batches = sorted({int(b) for b in batches})
    if not batches or batches[0] < 1:
        raise InputError("give batch sizes of at least 1", source=src, field="--batches")
    if steps < 1:
        raise InputError("steps must be at least 1", source=src, field="--steps")
    splits = list(dict.fromkeys(attention_gpus))
    ev = _Evaluator(base, sets, tpot_ms=tpot_ms, stat=stat, objective=objective, steps=steps, seed=seed,
                    progress=progress)
    for a in splits:
        if a is not None and not 0 < a < ev.G:
            raise InputError(f"{a} leaves no GPU for the experts of a {ev.G}-GPU cluster", source=src,
                             field="--attention-gpus")
    order = {(a, b): i * len(batches) + j for i, a in enumerate(splits) for j, b in enumerate(batches)}
    if method == "exhaustive":
        for a in splits:
            for b in batches:
                ev(a, b)
    else:
        for a in splits:  # largest feasible batch: those below lo are feasible, those above hi not
            lo, hi = 0, len(batches) - 1
            while lo <= hi:
                mid = (lo + hi) // 2
                if ev(a, batches[mid]).feasible:
                    lo = mid + 1
                else:
                    hi = mid - 1
    points = sorted(ev.cache.values(), key=lambda p: order[(p.attention_gpus, p.batch)])
    feas = [p for p in points if p.feasible]
    best = min(feas, key=lambda p: _key(p, order)) if feas else None
    settings = {"scenario": str(base), "tpot_limit_ms": tpot_ms, "stat": stat, "objective": objective,
                "method": method, "steps": steps, "batches": batches, "attention_gpus": splits,
                "gpus": ev.G, "runs": len(points), "space": len(order)}
    return TpotSearch(best=best, points=points, frontier=frontier(points), settings=settings)


def format_search(res: TpotSearch) -> str:
    """The search as a readable report: chosen point, every point run, frontier."""
    st = res.settings
    obj = "tok/s/GPU" if st["objective"] == "per_gpu" else "tok/$"
    lines = [f"search     {st['scenario']}: TPOT {st['stat']} <= {st['tpot_limit_ms']:g} ms, objective {obj}, "
             f"{st['method']} ({st['runs']} of {st['space']} points run)"]
    b = res.best
    if b is None:
        lines.append("best       none: no point meets the limit")
    else:
        split = "co-located" if b.attention_gpus is None else f"AFD {b.attention_gpus} attention + " \
                f"{st['gpus'] - b.attention_gpus} expert GPUs"
        lines.append(f"best       {split}, batch {b.batch} per rank: TPOT {b.tpot_ms:.2f} ms, {b.objective:.1f} {obj}, "
                     f"{b.throughput_tok_s:.0f} tok/s")
    head = f"{'attn GPUs':>9} {'batch':>6} {'TPOT ms':>9} {obj:>11}  status"
    lines += ["", head, "-" * len(head)]
    front = {(p.attention_gpus, p.batch) for p in res.frontier}
    for p in res.points:
        a = "-" if p.attention_gpus is None else str(p.attention_gpus)
        tp = "-" if p.tpot_ms is None else f"{p.tpot_ms:.2f}"
        ob = "-" if p.objective is None else f"{p.objective:.1f}"
        status = "ok" if p.feasible else p.reason
        if (p.attention_gpus, p.batch) in front:
            status += " (frontier)"
        lines.append(f"{a:>9} {p.batch:>6} {tp:>9} {ob:>11}  {status}")
    return "\n".join(lines)
