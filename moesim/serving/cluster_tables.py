"""Step costs of expert-parallel deployments for the request-level serving models on a cluster.

Serving on a cluster is modelled in two levels (:mod:`moesim.serving.pd_disagg` for disaggregated
prefill/decode, :mod:`moesim.serving.ep_serving` for co-located and attention-FFN-disaggregated
deployments): the expert-parallel engine (:mod:`moesim.engine.expert_parallel`) prices steps of a
fixed shape (so many tokens per data-parallel attention rank, at a given context), and a
request-level SimPy model moves requests through steps priced from those tables. This module holds
the part both share:

* :func:`pool_scenario` — the scenario of one fixed-shape expert-parallel run on a pool of GPUs;
* :class:`RoutingFile` — the scenario's routing materialised once, so that the dozens of table runs
  do not synthesise the same trace again (the array is the same, so the runs are too);
* :func:`step_time` — the mean step time of such a run;
* :class:`EpStepTable` — step time by tokens per rank and context, ``a(n) + b(n) x context``;
* :class:`InSystem` — the time-average of requests in the system (for Little's law);
* :func:`no_cache_block` — the ``cache`` block of a summary where every expert is resident.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

import numpy as np

from moesim.errors import InputError


def pool_scenario(scenario, *, gpus: int, batch: int, context: int, alltoall: dict | None, steps: int,
                  parallel: dict | None = None, trace: dict | None = None, source: str | None = None) -> dict:
    """A fixed-batch expert-parallel scenario (as a dict) on ``gpus`` GPUs of the cluster's kind:
    ``batch`` sequences per attention rank at ``context`` tokens, ``steps`` decode steps.
    ``parallel`` overrides fields of the ``parallel`` block (``prefill_gpus`` is always dropped),
    ``alltoall`` replaces the all-to-all policy, ``trace`` the trace block."""
    d = scenario.model_dump(mode="json")
    par = {**d["parallel"], "prefill_gpus": None, **(parallel or {})}
    ranks = (par.get("attention_gpus") or gpus) // par.get("attention_tp", 1)
    d["workload"] = {"batch_size": batch, "max_tokens": ranks * batch * steps, "warmup_tokens": 0,
                     "loop_trace": True, "context_tokens": context}
    d["parallel"] = par
    gpn = d["cluster"]["gpus_per_node"]
    if gpus > gpn and gpus % gpn:
        # a partial last node would need a cluster of unequal nodes, which the topology has not
        raise InputError(f"a pool of {gpus} GPUs is neither part of one node nor whole nodes of {gpn} GPUs; "
                         "pools (prefill_gpus, the decode rest, elastic start/end) must be one of those",
                         source=source, field="parallel")
    if gpus % gpn:
        d["cluster"]["gpus_per_node"] = gpus
    d["cluster"]["nodes"] = gpus // d["cluster"]["gpus_per_node"]
    if alltoall is not None:
        d["policies"]["alltoall"] = alltoall
    if trace is not None:
        d["trace"] = trace
    d["policies"].pop("batching", None)
    d.pop("include", None)
    return d


def run_pool(scenario_dict: dict, source: str) -> dict:
    """Run one fixed-batch expert-parallel scenario dict; its summary."""
    from moesim.config.loader import scenario_from_dict
    from moesim.engine.run import simulate

    sc = scenario_from_dict(copy.deepcopy(scenario_dict), source=source)
    return simulate(sc, source=source).summary


def step_time(scenario_dict: dict, source: str) -> float:
    """Mean step time (s) of a fixed-batch expert-parallel run."""
    return float(run_pool(scenario_dict, source)["tpot_ms"]["mean"]) * 1e-3


class RoutingFile:
    """The scenario's trace block for table runs: a synthetic trace is generated once and written
    to a temporary ``.npz`` that every table run reads (a file trace is used as it is). Use as a
    context manager; the file is removed on exit."""

    def __init__(self, scenario, source: str):
        self.scenario, self.source = scenario, source
        self.dir = None
        self.block = None
        self.trace = None  # the loaded (or synthesised) trace, routing policies not applied

    def __enter__(self) -> "RoutingFile":
        from moesim.engine.build import load_routing
        from moesim.traces import save_trace

        tc = self.scenario.trace
        trace, _ = load_routing(self.scenario, self.source)
        self.trace = trace
        if tc.path is not None:
            self.block = tc.model_dump(mode="json")
            return self
        self.dir = tempfile.mkdtemp(prefix="moesim-routing-")
        path = Path(self.dir) / "routing"  # a directory trace: memory-mapped, not compressed
        save_trace(trace, path)
        self.block = {"path": str(path), "layers": tc.layers}
        return self

    def __exit__(self, *exc) -> bool:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        return False


def token_grid(max_tokens: int, points=None) -> list:
    """Tokens per rank at which a table is measured: ``points`` (those up to ``max_tokens``), else 1
    and the powers of two below ``max_tokens``; ``max_tokens`` itself always."""
    hi = max(1, int(max_tokens))
    if points:
        return sorted({*(int(p) for p in points if p < hi), hi})
    return sorted({1, *[2**k for k in range(1, 20) if 2**k < hi], hi})


class EpStepTable:
    """Step time of one expert-parallel deployment as ``a(n) + b(n) x c``: ``n`` tokens on every
    data-parallel attention rank, each reading the KV of ``c`` earlier positions.

    Each grid point ``n`` is measured by two fixed-batch runs of ``steps`` decode steps on the same
    trace rows (so the same placement and routing): one at context 0, one at a context as long as
    the KV memory lets ``n`` sequences hold (at most ``max_context``). A run's step ``s`` reads
    ``context + s`` positions, so the runs sit at mean contexts ``(steps - 1) / 2`` and
    ``context + (steps - 1) / 2``; the line through them gives ``a`` and ``b``. In a step without
    overlap attention is additive and linear in the context (the roofline's attention core), so the
    line is exact there; with micro-batch overlap or attention-FFN ping-pong it is a linear fit.
    Between grid points ``a`` and ``b`` are interpolated linearly in ``n``.
    """

    def __init__(self, scenario, *, gpus: int, max_tokens: int, max_context: int, routing: RoutingFile,
                 source: str, parallel: dict | None = None, steps: int = 2, kv_room_tokens=None, points=None):
        self.gpus = gpus
        self.steps = steps
        self.n = token_grid(max_tokens, points)
        mb = (parallel or {}).get("micro_batches", scenario.parallel.micro_batches)
        a, b, c_hi = [], [], []
        self.memory = None
        off = (steps - 1) / 2.0
        for n in self.n:
            par = {**(parallel or {}), "micro_batches": min(mb, n)}  # fewer sequences than micro-batches: fewer

            def run(ctx, n=n, par=par):
                d = pool_scenario(scenario, gpus=gpus, batch=n, context=ctx, alltoall=None, steps=steps,
                                  parallel=par, trace=routing.block, source=source)
                return run_pool(d, source)

            s0 = run(0)
            if self.memory is None:
                self.memory = s0["memory"]
            t0 = s0["tpot_ms"]["mean"] * 1e-3
            room = kv_room_tokens(self.memory) if kv_room_tokens is not None else max_context + steps
            ctx = int(max(0, min(max_context, room // n - steps)))
            if ctx > 0:
                t1 = run(ctx)["tpot_ms"]["mean"] * 1e-3
                slope = (t1 - t0) / ctx
            else:  # no KV room for n sequences with any context: only context-0 (prefill) steps of
                slope = 0.0  # this size can run, so the slope is never used
            a.append(t0 - slope * off)
            b.append(slope)
            c_hi.append(ctx)
        self.a = np.array(a)
        self.b = np.array(b)
        self.context_measured = c_hi

    def time(self, n: float, context: float) -> float:
        """Seconds of a step with ``n`` tokens per rank reading ``context`` positions each (mean)."""
        a = float(np.interp(n, self.n, self.a))
        b = float(np.interp(n, self.n, self.b))
        return a + b * context

    def as_dict(self) -> dict:
        """The table for ``summary.json`` (ms, ms per 1k context positions)."""
        return {str(n): {"ms": float(a * 1e3), "ms_per_1k_context": float(b * 1e6), "context_measured": int(c)}
                for n, a, b, c in zip(self.n, self.a, self.b, self.context_measured)}


class InSystem:
    """Requests in the system (arrived, not finished) integrated over simulated time."""

    def __init__(self):
        self.n = 0
        self.t = 0.0
        self.area = 0.0

    def change(self, now: float, delta: int) -> None:
        self.area += self.n * (now - self.t)
        self.t = now
        self.n += delta


def no_cache_block(scenario, note: str = "expert-parallel pools: every expert resident, no cache") -> dict:
    """The summary's ``cache`` block of a deployment that keeps every expert resident."""
    return {"policy": scenario.policies.cache.kind, "accesses": 0, "hits": 0, "misses": 0, "hit_rate": None,
            "prefetch_issued": 0, "prefetch_used": 0, "prefetch_wasted": 0, "evictions": 0, "note": note}


def require(cond: bool, msg: str, *, source: str, field: str) -> None:
    """An InputError unless ``cond``."""
    if not cond:
        raise InputError(msg, source=source, field=field)
