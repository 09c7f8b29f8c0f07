"""The cache-policy interface and the accounting every cache policy shares.

Accounting (DESIGN 3.2): one access = one (decode step, MoE layer, distinct expert). Within a step
the distinct experts arrive in order of first appearance; hits are touched first, then misses are
loaded; a miss never evicts an expert the same step needs (``protect``); a miss that finds no room
(every resident expert is protected, or the policy declines to admit it) is *streamed*: loaded into
a transient buffer, used, not cached, and counted as a miss.

Pools are sized in bytes so that experts of different sizes or precisions can share one pool; with
uniform experts a pool of ``C`` slots has ``C * expert_bytes`` bytes. A key is the integer
``column * num_experts + expert`` where ``column`` is the trace's MoE-layer column.

A subclass implements four hooks (``_on_hit``, ``_on_insert``, ``_victim``, ``_on_evict``) and may
override ``admit`` (bypass). Future-aware and score-based policies read the access sequence and gate
weights from :class:`CacheSetup` when they are built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

from pydantic import Field, model_validator

from moesim.errors import InputError
from moesim.policies.base import Policy, PolicyConfig

GIB = 2**30


class CacheConfig(PolicyConfig):
    """Common fields of capacity-limited caches.

    ``capacity_experts`` is the total number of expert slots in GPU memory; ``capacity_gib`` the
    whole expert-cache budget (slots = budget // expert bytes). With ``scope: per_layer`` the total
    is split equally over the MoE layers (floor). ``warm_start``: ``none`` (cold), ``first``,
    ``popular`` (the most used experts of the replayed trace, least used least recent: a profile
    taken on the same routing, as static-placement systems such as Fiddler do offline), or an
    explicit ``{model_layer: [experts, least recent first]}``.
    """

    capacity_experts: int | None = Field(default=None, ge=0)
    capacity_gib: float | None = Field(default=None, gt=0)
    scope: Literal["global", "per_layer"] = "global"
    warm_start: Literal["none", "first", "popular"] | dict[int, list[int]] = "none"
    transient_buffers: int = Field(
        default=2, ge=1, description="buffers for streamed (uncached) experts, beyond the cache"
    )

    @model_validator(mode="after")
    def _one_capacity(self):
        if self.capacity_experts is not None and self.capacity_gib is not None:
            raise ValueError("give capacity_experts or capacity_gib, not both")
        return self


@dataclass
class CacheSetup:
    """What a cache policy is told about the run when it is built.

    ``plan`` (a :class:`~moesim.engine.plan.DecodePlan`) and ``col_src`` give future-aware policies
    (Belady) the whole access sequence: access ``t`` is ``(step, column) = divmod(t, num_columns)``
    and its experts are ``plan.row(step, col_src[column])``. ``weights`` is the trace's gate-weight
    array ``[T, L, K]`` (or None) for score-based policies; ``batch_size`` rows form one step.
    """

    num_columns: int  # MoE layers simulated (one pool key range per column)
    num_experts: int
    expert_bytes: int  # bytes of one expert at the cached precision
    top_k: int
    model_layers: tuple[int, ...]  # model layer index of each column
    max_distinct_per_step: int  # most distinct experts one (step, layer) can need
    source: str = "scenario"
    plan: object = None
    col_src: tuple = ()
    experts: object = None  # trace experts [T, L, K] (rows in execution order)
    weights: object = None  # trace gate weights [T, L, K] or None
    batch_size: int = 1
    #: heterogeneous experts: bytes of each key (``column * num_experts + expert``), or None when
    #: every expert has ``expert_bytes`` (see :mod:`moesim.models.expert_sizes`)
    key_bytes: object = None

    def step_of(self, t: int) -> tuple[int, int]:
        """``(step, column)`` of access clock ``t``."""
        return divmod(t, self.num_columns)

    def future_row(self, step: int, column: int):
        """Distinct experts and token counts of ``(step, column)`` (needs ``plan``)."""
        return self.plan.row(step, self.col_src[column])

    def gate_mass(self, step: int, column: int) -> dict:
        """Summed gate weight per expert over the step's rows at ``column`` (token counts when the
        trace has no weights)."""
        src = self.col_src[column]
        T = self.experts.shape[0]
        if hasattr(self.plan, "step_rows"):  # a serving run: the step's rows are the scheduler's
            rows = self.plan.step_rows(step).tolist()
        else:
            rows = [(step * self.batch_size + i) % T for i in range(self.batch_size)]  # looped traces wrap
        ex = self.experts[rows, src].reshape(-1)
        if self.weights is None:
            w = [1.0] * len(ex)
        else:
            w = self.weights[rows, src].reshape(-1).tolist()
        out: dict = {}
        for e, x in zip(ex.tolist(), w):
            if e >= 0:
                out[e] = out.get(e, 0.0) + float(x)
        return out


@dataclass
class Pool:
    """One pool of GPU memory for experts: its capacity and what is resident (policy-ordered)."""

    index: int
    capacity_bytes: int
    used_bytes: int = 0
    order: dict = field(default_factory=dict)  # resident keys; policies may keep them ordered


@dataclass
class AccessResult:
    """Outcome of one (step, layer) access: hits, loads with the keys they evicted, streamed."""

    hits: list
    loads: list  # [(expert, [evicted keys])]
    streamed: list
    # keys evicted for a miss that still did not fit (mixed sizes: every other victim protected);
    # the miss is streamed and their room stays unused
    orphans: list = field(default_factory=list)


class CachePolicy(Policy):
    """Base of cache policies: pools, capacity, warm start and the shared accounting.

    With heterogeneous experts (``CacheSetup.key_bytes``) a pool's bytes are its slots times the
    bytes of an expert of multiplier 1 (``capacity_experts``) or the budget (``capacity_gib``), and
    experts of every size share it: a miss evicts until its own bytes fit."""

    family = "cache"
    #: whether the policy's bookkeeping works in bytes (False: it counts slots, e.g. ARC's lists)
    byte_sized: bool = True

    def __init__(self, config, setup: CacheSetup):
        super().__init__(config)
        self.setup = setup
        self.E = setup.num_experts
        self.expert_bytes = setup.expert_bytes
        self.pools: list[Pool] = []
        self.pool_of_column: list[Pool] = []
        self.resident: dict[int, Pool] = {}
        self.key_bytes: dict[int, int] = {}  # bytes of each resident copy (precision variants differ)
        self._sizes = setup.key_bytes  # per-key bytes of heterogeneous experts, or None
        if self._sizes is not None and not self.byte_sized:
            raise InputError(
                f"{config.kind} counts expert slots, so it cannot share a pool between experts of different "
                "sizes (model.expert_size_multipliers / a sized routing policy); use lru, lfu, fifo, belady or "
                "another byte-sized policy",
                source=setup.source, field="policies.cache.kind",
            )
        self._build_pools()

    # ----- capacity -----------------------------------------------------------------------------
    def slots_total(self) -> int:
        """Expert slots of the whole cache (all pools)."""
        c = self.config
        if c.capacity_experts is not None:
            return c.capacity_experts
        if c.capacity_gib is not None:
            return int(c.capacity_gib * GIB // self.expert_bytes)
        raise InputError(
            "needs capacity_experts or capacity_gib", field="policies.cache", source=self.setup.source
        )

    def _build_pools(self) -> None:
        s = self.setup
        total = self.slots_total()
        field_name = "policies.cache." + (
            "capacity_experts" if self.config.capacity_experts is not None else "capacity_gib"
        )
        if self.config.scope == "per_layer":
            per = total // s.num_columns
            if per < s.top_k:
                raise InputError(
                    f"{total} slots over {s.num_columns} layers give {per} per layer, smaller "
                    f"than top_k={s.top_k}; need at least {s.top_k * s.num_columns}",
                    source=s.source,
                    field=field_name,
                )
            self.pools = [Pool(i, per * self.expert_bytes) for i in range(s.num_columns)]
            self.pool_of_column = list(self.pools)
        else:
            if total < s.top_k:
                raise InputError(
                    f"capacity of {total} expert slots is smaller than top_k={s.top_k}",
                    source=s.source,
                    field=field_name,
                )
            pool = Pool(0, total * self.expert_bytes)
            self.pools = [pool]
            self.pool_of_column = [pool] * s.num_columns
        self._warm_start()

    def _warm_start(self) -> None:
        ws = self.config.warm_start
        s = self.setup
        if ws == "none":
            return
        if ws == "first":
            if self.config.scope == "per_layer":
                for col in range(s.num_columns):
                    pool = self.pool_of_column[col]
                    for key in self._fitting(pool, range(col * self.E, (col + 1) * self.E)):
                        self._insert(pool, key, -1)
            else:
                pool = self.pools[0]
                for key in self._fitting(pool, range(s.num_columns * self.E)):
                    self._insert(pool, key, -1)
            return
        if ws == "popular":
            self._warm_popular()
            return
        col_of = {m: c for c, m in enumerate(s.model_layers)}
        for layer in sorted(ws):
            if layer not in col_of:
                raise InputError(
                    f"layer {layer} is not an MoE layer of the trace (columns: {list(s.model_layers)})",
                    source=s.source,
                    field=f"policies.cache.warm_start.{layer}",
                )
            col = col_of[layer]
            pool = self.pool_of_column[col]
            for e in ws[layer]:
                if not 0 <= e < self.E:
                    raise InputError(
                        f"expert {e} out of range 0..{self.E - 1}",
                        source=s.source,
                        field=f"policies.cache.warm_start.{layer}",
                    )
                key = col * self.E + e
                if key in self.resident:
                    continue
                if pool.used_bytes + self.size_of(key) > pool.capacity_bytes:
                    raise InputError(
                        "more warm-start experts than the cache holds",
                        source=s.source,
                        field=f"policies.cache.warm_start.{layer}",
                    )
                self._insert(pool, key, -1)

    def _warm_popular(self) -> None:
        s = self.setup
        if s.experts is None:
            raise InputError("warm_start 'popular' needs the trace", source=s.source, field="policies.cache.warm_start")
        import numpy as np

        counts = np.zeros((s.num_columns, self.E), dtype=np.int64)
        for c in range(s.num_columns):
            col = np.asarray(s.experts[:, s.col_src[c]]).reshape(-1)
            counts[c] = np.bincount(col[col >= 0].astype(np.int64), minlength=self.E)[: self.E]
        flat = counts.reshape(-1)
        if self.config.scope == "per_layer":
            for c in range(s.num_columns):
                pool = self.pool_of_column[c]
                order = np.argsort(-counts[c], kind="stable")
                top = self._fitting(pool, (c * self.E + int(e) for e in order))
                for key in top[::-1]:  # least used first = least recent
                    self._insert(pool, key, -1)
        else:
            pool = self.pools[0]
            top = self._fitting(pool, (int(k) for k in np.argsort(-flat, kind="stable")))
            for key in top[::-1]:
                self._insert(pool, key, -1)

    def _fitting(self, pool: Pool, keys) -> list:
        """The longest prefix of ``keys`` whose sizes fit in ``pool``'s free bytes (uniform experts:
        the first ``free // expert_bytes``)."""
        out = []
        room = pool.capacity_bytes - pool.used_bytes
        for key in keys:
            b = self.size_of(key)
            if b > room:
                break
            room -= b
            out.append(key)
        return out

    # ----- hooks for subclasses -----------------------------------------------------------------
    def size_of(self, key: int) -> int:
        """Bytes one cached copy of ``key`` takes: ``expert_bytes``, or the key's own bytes with
        heterogeneous experts."""
        sz = self._sizes
        return self.expert_bytes if sz is None else sz[key]

    def admit(self, pool: Pool, key: int, t: int) -> bool:
        """Whether a missed ``key`` may enter the cache (False = stream it)."""
        return True

    def _on_hit(self, pool: Pool, key: int, t: int) -> None:
        raise NotImplementedError

    def _on_insert(self, pool: Pool, key: int, t: int) -> None:
        raise NotImplementedError

    def _victim(self, pool: Pool, protect) -> int | None:
        """The resident key of ``pool`` to evict, never one in ``protect``; None if none may go."""
        raise NotImplementedError

    def _on_evict(self, pool: Pool, key: int) -> None:
        pass

    # ----- shared accounting ----------------------------------------------------------------------
    def _insert(self, pool: Pool, key: int, t: int, size: int | None = None) -> None:
        size = self.size_of(key) if size is None else size
        pool.order[key] = None
        pool.used_bytes += size
        self.key_bytes[key] = size
        self.resident[key] = pool
        self._on_insert(pool, key, t)

    def _evict(self, pool: Pool, key: int) -> None:
        del pool.order[key]
        pool.used_bytes -= self.key_bytes.pop(key)
        del self.resident[key]
        self._on_evict(pool, key)

    def access(self, column: int, experts: Sequence[int], t: int, sizes: dict | None = None) -> AccessResult:
        """Serve one (step, layer): ``experts`` are the distinct experts in first-appearance order;
        ``t`` is the access clock (increases by one per (step, layer)); ``sizes`` gives the bytes
        of a missed expert's copy when it differs from :meth:`size_of` (a lower-precision load)."""
        base = column * self.E
        pool = self.pool_of_column[column]
        resident = self.resident
        hits = []
        missed = []
        for e in experts:
            if base + e in resident:
                hits.append(e)
            else:
                missed.append(e)
        for e in hits:
            self._on_hit(pool, base + e, t)
        loads = []
        streamed = []
        orphans = []
        if missed:
            protect = {base + e for e in experts}
            for e in missed:
                key = base + e
                size = sizes[e] if sizes and e in sizes else self.size_of(key)
                if not self.admit(pool, key, t) or size > pool.capacity_bytes:
                    streamed.append(e)
                    continue
                fits, evicted = self.make_room(pool, size, protect)
                if not fits:
                    streamed.append(e)  # evicted ones stay evicted: their room is simply unused
                    orphans.extend(evicted)
                    continue
                self._insert(pool, key, t, size)
                loads.append((e, evicted))
        return AccessResult(hits, loads, streamed, orphans)

    def prefetch(self, column: int, expert: int, t: int, protect, size: int | None = None) -> tuple[bool, list]:
        """Make ``(column, expert)`` resident ahead of use. Returns (inserted, evicted keys); a key
        already resident, refused by ``admit``, or with no evictable room is not inserted.
        ``protect`` holds keys that must not be evicted (the current step's and the prefetch
        set's); ``size``: bytes of the copy when it differs from :meth:`size_of` (a precision
        policy's format for that expert)."""
        key = column * self.E + expert
        if key in self.resident:
            return False, []
        pool = self.pool_of_column[column]
        size = self.size_of(key) if size is None else size
        if not self.admit(pool, key, t) or size > pool.capacity_bytes:
            return False, []
        fits, evicted = self.make_room(pool, size, protect)
        if fits:
            self._insert(pool, key, t, size)
        return fits, evicted

    def make_room(self, pool: Pool, nbytes: int, protect) -> tuple[bool, list]:
        """Evict the policy's victims from ``pool`` (never a key in ``protect``) until ``nbytes``
        more fit. Returns (fits, evicted keys in eviction order); when no victim is left before it
        fits, the keys evicted so far stay evicted. Demand loads, prefetches and precision top-ups
        all make room this way."""
        evicted = []
        while pool.used_bytes + nbytes > pool.capacity_bytes:
            v = self._victim(pool, protect)
            if v is None:
                return False, evicted
            self._evict(pool, v)
            evicted.append(v)
        return True, evicted

    def transient_buffer_count(self) -> int:
        """GPU buffers for streamed experts (0 when the policy never streams)."""
        return getattr(self.config, "transient_buffers", 0)

    def resident_keys(self) -> list[int]:
        """Every resident key (all pools)."""
        return list(self.resident)

    def resident_slots_bytes(self) -> int:
        """GPU bytes reserved for the cache (all pools at capacity)."""
        return sum(p.capacity_bytes for p in self.pools)


class RecencyScoredCache(CachePolicy):
    """Base of policies that keep each pool in recency order (a hit or an insert moves the key to
    the most-recent end) and evict the unprotected key with the lowest :meth:`_score`, the least
    recent one on ties. ``_score_floor``: a score no key can go below (the search stops there)."""

    _score_floor = None

    def _score(self, key: int):
        """Eviction score of resident ``key``: lower is evicted first."""
        raise NotImplementedError

    def _on_hit(self, pool: Pool, key: int, t: int) -> None:
        order = pool.order
        del order[key]
        order[key] = None

    def _on_insert(self, pool: Pool, key: int, t: int) -> None:
        pass  # _insert appended the key at the most-recent end

    def _victim(self, pool: Pool, protect) -> int | None:
        best = best_s = None
        floor = self._score_floor
        score = self._score
        for key in pool.order:  # least recent first: strict < keeps the least recent on ties
            if key in protect:
                continue
            v = score(key)
            if best is None or v < best_s:
                best, best_s = key, v
                if v == floor:
                    break
        return best
