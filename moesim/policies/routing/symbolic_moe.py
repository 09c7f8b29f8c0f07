"""Symbolic-MoE: routing between whole models, each request sent to k of them, batched by model."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from moesim.config.base import StrictModel
from moesim.errors import InputError
from moesim.policies.base import PolicyConfig
from moesim.policies.routing.base import RoutingPolicy, RoutingResult


class PoolModel(StrictModel):
    """One model of the pool: a name and its parameter count (billions)."""

    name: str
    params_b: float = Field(gt=0, description="parameters, billions (1e9)")


def request_blocks(T: int, request, rows_per_request: int | None) -> list[np.ndarray]:
    """Row indices of each request, in order of first appearance: by the trace's ``request`` ids
    when it has them, else consecutive blocks of ``rows_per_request`` rows (the last may be short)."""
    if request is not None:
        req = np.asarray(request)
        _, first, inv = np.unique(req, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")
        return [np.flatnonzero(inv == i) for i in order]
    n = int(rows_per_request or T)
    return [np.arange(s, min(s + n, T)) for s in range(0, T, n)]


def choose_models(votes: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` models with the most votes (ties, and models with none, to the lower id)."""
    return np.lexsort((np.arange(len(votes)), -votes))[:k]


def runs(seq) -> int:
    """Maximal runs of equal consecutive values (the loads of a one-model cache)."""
    seq = list(seq)
    return sum(1 for i, x in enumerate(seq) if i == 0 or x != seq[i - 1])


def schedules(chosen: list, aggregator: int | None) -> tuple[list, list]:
    """Jobs ``(request index, model)`` in arrival order (each request's models in turn, then its
    aggregator job) and grouped (every job of one model together, models in order of first need,
    requests in order within a model; the aggregator's jobs last, as they need the answers)."""
    arrival = []
    for r, pick in enumerate(chosen):
        arrival += [(r, int(m)) for m in pick]
        if aggregator is not None:
            arrival.append((r, aggregator))
    expert_jobs = [(r, int(m)) for r, pick in enumerate(chosen) for m in pick]
    first: dict = {}
    for _, m in expert_jobs:
        first.setdefault(m, len(first))
    grouped = sorted(expert_jobs, key=lambda j: (first[j[1]], j[0]))
    if aggregator is not None:
        grouped += [(r, aggregator) for r in range(len(chosen))]
    return arrival, grouped


class SymbolicMoE(RoutingPolicy):
    """Symbolic-MoE (Chen, Yun, Stengel-Eskin, Chen & Bansal 2025, arXiv:2503.05641, "Symbolic
    Mixture-of-Experts: Adaptive Skill-based Routing for Heterogeneous Reasoning") routes each
    instance (request) to k whole pre-trained LLMs picked by the skills the instance needs; each
    writes its own answer and an aggregator model combines them. Loading and offloading models per
    instance is costly, so its batch inference groups the instances by assigned model and loads each
    model once.

    moesim models each pool model as one "expert" of the scenario's MoE layer 0 (the scenario's
    model is a thin shell whose ``num_experts`` is the pool size and whose routed experts stand for
    the models): the expert's size multiplier is the model's parameters over the shell's
    ``expert_params``, so a load moves the whole model's bytes, the cache holds whole models in
    bytes, and a decode step of ``n`` tokens costs the model's weight bytes and ``2 x params x n``
    FLOPs (a roofline of its matmuls). The other MoE layers of the shell route nowhere and keep the
    shell's own expert size (so a shell with as many MoE layers as a bundled trace's columns holds
    the pool's bytes once, not once per layer).

    Left open (moesim's choices, as config): the skill-based selection itself, which a routing trace
    cannot carry. A request's rows (the trace's ``request`` ids, else blocks of
    ``rows_per_request`` rows) vote with their choices at the trace's first MoE column (expert e =
    pool model e) and the request goes to the ``k`` most voted models (ties to the lower id). Each
    (request, model) job replays the request's rows (its generated tokens) on that model;
    ``aggregator`` (a pool index) adds one job per request on the aggregator after its k jobs, of
    the same length (an assumption: the paper's aggregator reads k answers and writes one).
    ``order``: ``grouped`` (the paper's batch inference: every job of one model together, models in
    order of first need, the aggregator's jobs last) or ``arrival`` (requests in order, each
    request's jobs in turn: the naive schedule). Reported: requests, jobs, model switches of the
    replayed order and of both orders (each is the number of loads of a cache that holds one model
    at batch 1), rows per model, and a quality proxy: the share of each request's votes its k
    models cover. Not modelled: the models' attention and KV caches, prompt lengths, the answers'
    different lengths per model."""

    extra_inputs = ("request", "expert_params")
    #: quality proxy in ``routing.effects``: the share of the requests' votes their k models cover
    quality_proxy = "skill_vote_coverage"

    def baseline(self, trace, result):
        """Compared with per-token routing over the same pool: every trace row runs on the model of
        its own first-column choice (a token-level MoE of whole models), at the models' sizes."""
        ex = np.asarray(trace.experts)
        base = np.full_like(ex, -1)
        base[:, 0] = ex[:, 0]
        return base, result.size_multipliers

    class Config(PolicyConfig):
        """The model pool, k models per request, and the job order."""

        kind: Literal["symbolic_moe"] = "symbolic_moe"
        models: list[PoolModel] = Field(min_length=1, description="the pool: one per routed expert of the shell model")
        k: int = Field(default=2, ge=1, description="models per request")
        order: Literal["grouped", "arrival"] = "grouped"
        rows_per_request: int | None = Field(default=None, ge=1, description="without trace request ids: rows per request")
        aggregator: int | None = Field(default=None, ge=0, description="pool index of the aggregator model, None = none")

    def transform(self, experts, weights, *, num_experts, seed, request=None, expert_params=None):
        cfg = self.config
        src = getattr(self.setup, "source", None)
        M = len(cfg.models)
        if M != num_experts:
            raise InputError(f"{M} models in the pool, the scenario's model has num_experts={num_experts} (one per "
                             "pool model)", field="policies.routing.models", source=src)
        if cfg.k > M:
            raise InputError(f"k={cfg.k} exceeds the {M} models of the pool", field="policies.routing.k", source=src)
        if cfg.aggregator is not None and cfg.aggregator >= M:
            raise InputError(f"aggregator {cfg.aggregator} is not a pool index (0..{M - 1})",
                             field="policies.routing.aggregator", source=src)
        if request is None and cfg.rows_per_request is None:
            raise InputError("the trace has no request ids: set rows_per_request", field="policies.routing.rows_per_request",
                             source=src)
        ex = np.asarray(experts)
        T, L, _ = ex.shape
        blocks = request_blocks(T, request, cfg.rows_per_request)
        col0 = ex[:, 0, :]
        chosen, coverage = [], []
        for rows in blocks:
            v = col0[rows].reshape(-1)
            votes = np.bincount(v[v >= 0].astype(np.int64), minlength=M)[:M]
            pick = choose_models(votes, cfg.k)
            chosen.append(pick)
            coverage.append(float(votes[pick].sum() / votes.sum()) if votes.sum() else 1.0)
        arrival, grouped = schedules(chosen, cfg.aggregator)
        jobs = arrival if cfg.order == "arrival" else grouped
        rows_out = np.concatenate([blocks[r] for r, _ in jobs]) if jobs else np.zeros(0, dtype=np.int64)
        model_of_row = np.concatenate([np.full(len(blocks[r]), m) for r, m in jobs]) if jobs else np.zeros(0)
        out = np.full((len(rows_out), L, 1), -1, dtype=np.int32)
        out[:, 0, 0] = model_of_row
        w = np.zeros((len(rows_out), L, 1), dtype=np.float32)
        w[:, 0, 0] = 1.0
        # size of each pool model as a multiple of the shell's routed expert
        if not expert_params:
            raise InputError("needs the model's expert_params", field="policies.routing", source=src)
        mult = np.array([pm.params_b * 1e9 / expert_params for pm in cfg.models])
        size = np.ones((L, M))
        size[0] = mult  # only column 0 routes (to the models)
        stats = {
            "requests": len(blocks),
            "jobs": len(jobs),
            "order": cfg.order,
            "model_switches": runs(m for _, m in jobs),
            "model_switches_arrival": runs(m for _, m in arrival),
            "model_switches_grouped": runs(m for _, m in grouped),
            "rows_per_model": {cfg.models[m].name: int((model_of_row == m).sum()) for m in range(M)},
            "model_bytes_multiplier": {pm.name: float(x) for pm, x in zip(cfg.models, mult)},
            "skill_vote_coverage": float(np.mean(coverage)) if coverage else 1.0,
        }
        note = (f"Symbolic-MoE: {len(blocks)} requests each routed to {cfg.k} of {M} whole models (the most voted by "
                f"the request's first-layer choices{', plus the aggregator' if cfg.aggregator is not None else ''}), "
                f"{len(jobs)} jobs replayed in {cfg.order} order ({stats['model_switches']} model switches; arrival "
                f"order {stats['model_switches_arrival']}, grouped {stats['model_switches_grouped']}); each expert "
                "of MoE layer 0 is a whole model, loaded and cached at its own bytes")
        return RoutingResult(out, w, stats, note, size_multipliers=size, rows=rows_out)
