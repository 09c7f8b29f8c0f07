"""The serving scheduler: the bridge between arriving requests, a batching policy, KV memory and the
single-GPU engine.

The engine's host loop asks :meth:`Scheduler.next_step` for a step whenever the previous one has
ended (``now`` = that step's end, when the host has the sampled tokens): the scheduler takes in the
requests that have arrived by then, lets the batching policy pick the step's work through a narrow
interface (:class:`StepBuilder`: admit a waiting request, add a prefill chunk, give running
requests a decode token, pre-empt), allocates their KV blocks, and returns a :class:`Step` with the
stage times of that token mix and the trace rows its tokens replay (set into the
:class:`~moesim.engine.plan.ServingPlan` the engine and the policies read). When the step ends,
:meth:`Scheduler.finish_step` advances every request of the step (first tokens, output tokens,
finished requests leaving and freeing their KV). Nothing here creates or waits on SimPy events
(``waiter`` only holds the event the engine's host waits on while idle, for the arrival process to
trigger).

**KV memory.** The budget (bytes) is what is left of usable HBM after the dense weights, the
expert-cache slots and the transient buffers (or ``kv_cache_gib`` when smaller); KV is allocated in
blocks of ``kv_block_tokens`` tokens. ``kv_policy: wait`` reserves a request's whole need
(``P + O - 1`` positions) when it is admitted and admits only what fits next to the reservations
(admission control; the output length stands for the ``max_tokens`` bound a server would
reserve); ``preempt`` admits a request when its first chunk fits and, when a step's decode tokens
would overflow the budget, pre-empts the youngest running request (latest arrival): its KV is freed
and it goes back to the front of the queue, to recompute its prompt and the tokens generated so far
in one prefill when re-admitted (vLLM's recompute pre-emption; Kwon et al., SOSP 2023). Either way
the KV in use never exceeds the budget (checked at every allocation).
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from moesim.serving.requests import DECODE, DONE, PREFILL, WAITING


class KvBudgetError(RuntimeError):
    """Raised if an allocation would exceed the KV budget (a scheduler bug, never an input)."""


@dataclass
class Step:
    """One engine step as the scheduler formed it."""

    index: int
    items: list  # [(request, tokens, is_prefill, kv_before)]
    tokens: int
    samples: int  # sequences producing a token this step
    attn: float  # attention-core seconds of one block
    dense_base: list
    dense_membound: list
    tail_base: float
    tail_membound: bool
    prefill_tokens: int = 0
    start_s: float = 0.0


@dataclass
class KvState:
    """KV blocks: budget, in use, reserved (wait policy), peak."""

    budget_bytes: int
    bytes_per_token: int
    block_tokens: int
    budget_blocks: int = 0
    used: int = 0
    reserved: int = 0
    peak: int = 0

    def __post_init__(self):
        self.block_bytes = self.bytes_per_token * self.block_tokens
        self.budget_blocks = int(self.budget_bytes // self.block_bytes) if self.block_bytes else 1 << 62

    def blocks(self, tokens: int) -> int:
        """Blocks holding ``tokens`` token positions."""
        bt = self.block_tokens
        return -(-tokens // bt)


@dataclass
class ServingStats:
    """What the scheduler recorded for the metrics."""

    step_tokens: list = field(default_factory=list)
    step_seqs: list = field(default_factory=list)
    step_prefill_tokens: list = field(default_factory=list)
    step_kv_blocks: list = field(default_factory=list)
    step_start: list = field(default_factory=list)
    itl_s: list = field(default_factory=list)  # inter-token latencies of measured requests
    preemptions: int = 0
    in_system_area: float = 0.0  # integral of (arrived - finished) over time
    in_system_t: float = 0.0
    in_system_n: int = 0
    arrived: int = 0
    arrival_events: int = 0  # SimPy events of the arrival process (arrivals that advanced the clock)
    idle_waits: int = 0  # SimPy events of the host waiting for an arrival


class StepBuilder:
    """What a batching policy may do while forming a step (its whole view of the serving state).

    ``waiting`` (FCFS: arrival order, pre-empted requests at the front) and ``running`` (arrival
    order; the last is the youngest) are read-only for the policy; it changes them only through
    the methods below, which keep the KV accounting."""

    def __init__(self, sched: "Scheduler"):
        self._s = sched

    @property
    def now(self) -> float:
        return self._s.now

    @property
    def waiting(self) -> deque:
        return self._s.waiting

    @property
    def running(self) -> list:
        return self._s.running

    @property
    def arrivals_done(self) -> bool:
        """Every request has arrived (none will join the queue later)."""
        return self._s.arrivals_done

    @property
    def kv_policy(self) -> str:
        return self._s.kv_policy

    @property
    def scheduled(self) -> set:
        """Ids of the requests already in this step."""
        return self._s.in_step

    def prefill_left(self, req) -> int:
        """Positions the request's current prefill still has to compute."""
        return req.target - req.kv_tokens

    def try_admit(self, req, tokens: int) -> bool:
        """Admit waiting ``req`` with a first prefill chunk of ``tokens`` positions, if KV allows."""
        return self._s._admit(req, tokens)

    def add_prefill(self, req, tokens: int) -> int:
        """Give running ``req`` a prefill chunk of up to ``tokens`` positions (fewer if the KV budget
        allows fewer); returns the positions added (0 = none)."""
        return self._s._add(req, min(tokens, req.target - req.kv_tokens), True)

    def add_decodes(self, reqs) -> list:
        """Give each request of ``reqs`` (oldest first) one decode token. When the KV budget cannot
        hold one more token, ``preempt`` pre-empts the youngest running request (possibly the one
        asking) until it fits; returns the requests that got their token."""
        return self._s._decodes(reqs)

    def preempt(self, req) -> None:
        """Pre-empt running ``req`` (its KV is freed; it waits at the front of the queue)."""
        self._s._preempt(req)


class Scheduler:
    """Serving state across a run; see the module docstring."""

    def __init__(self, *, requests: list, policy, kv: KvState, kv_policy: str, plan, table, warmup_requests: int = 0):
        self.requests = requests
        self.arrival_times = [r.arrival for r in requests]
        self.policy = policy
        self.kv = kv
        self.kv_policy = kv_policy
        self.plan = plan
        self.table = table
        self.warmup = warmup_requests
        self.waiting: deque = deque()
        self.running: list = []
        self.next_arrival = 0
        self.now = 0.0
        self.finished = 0
        self.step = None
        self.steps = 0
        self.in_step: set = set()
        self._items: list = []
        self.stats = ServingStats()
        self.waiter = None  # a SimPy event the host waits on when there is nothing to run
        self.builder = StepBuilder(self)
        self.routing_rows = ""  # how requests map to trace rows (set by moesim.engine.build)

    # ----- arrivals ----------------------------------------------------------------------------------
    def _take_arrivals(self, now: float) -> None:
        reqs, i, n = self.requests, self.next_arrival, len(self.requests)
        while i < n and reqs[i].arrival <= now:
            self.waiting.append(reqs[i])
            i += 1
        self.next_arrival = i

    def on_arrival(self, now: float) -> None:
        """A request arrived at ``now`` (the arrival process's event): number-in-system bookkeeping."""
        st = self.stats
        st.in_system_area += st.in_system_n * (now - st.in_system_t)
        st.in_system_t = now
        st.in_system_n += 1
        st.arrived += 1

    @property
    def done(self) -> bool:
        """Every request has finished."""
        return self.finished >= len(self.requests)

    @property
    def arrivals_pending(self) -> bool:
        return self.next_arrival < len(self.requests)

    @property
    def arrivals_done(self) -> bool:
        """Every request has arrived (none will join the queue later)."""
        return self.next_arrival >= len(self.requests)

    def may_continue(self) -> bool:
        """Whether another step can follow the current one (requests left after it)."""
        if self.arrivals_pending or self.waiting:
            return True
        st = self.step
        ending = 0
        if st is not None:
            for r, n, pre, kv0 in st.items:
                if (not pre or kv0 + n >= r.target) and r.generated + 1 >= r.output:
                    ending += 1
        return len(self.running) > ending

    # ----- KV ------------------------------------------------------------------------------------------
    def _grow(self, req, tokens: int) -> int:
        """Positions (<= tokens) that fit in ``req``'s KV now; allocates their blocks."""
        kv = self.kv
        need = kv.blocks(req.kv_tokens + tokens) - req.kv_blocks
        if self.kv_policy == "wait":
            # inside the reservation made at admission
            extra = need - (req.reserved_blocks - req.kv_blocks)
            if extra > 0:  # pragma: no cover - a reservation covers the whole request
                raise KvBudgetError(f"request {req.id} outgrew its KV reservation")
        elif kv.used + need > kv.budget_blocks:
            room = (kv.budget_blocks - kv.used + req.kv_blocks) * kv.block_tokens - req.kv_tokens
            tokens = max(0, min(tokens, room))
            need = kv.blocks(req.kv_tokens + tokens) - req.kv_blocks
        if tokens <= 0:
            return 0
        kv.used += need
        req.kv_blocks += need
        if kv.used > kv.budget_blocks:
            raise KvBudgetError(f"KV blocks in use {kv.used} > budget {kv.budget_blocks}")
        return tokens

    def _free(self, req) -> None:
        kv = self.kv
        kv.used -= req.kv_blocks
        req.kv_blocks = 0
        if req.reserved_blocks:
            kv.reserved -= req.reserved_blocks
            req.reserved_blocks = 0

    # ----- the policy's actions ------------------------------------------------------------------------
    def _admit(self, req, tokens: int) -> bool:
        kv = self.kv
        tokens = min(tokens, req.target - req.kv_tokens)
        if tokens <= 0:
            return False
        if self.kv_policy == "wait":
            need = kv.blocks(req.positions)
            if kv.reserved + need > kv.budget_blocks:
                return False
            kv.reserved += need
            req.reserved_blocks = need
        elif kv.used + kv.blocks(tokens) > kv.budget_blocks:
            return False
        if self.waiting and self.waiting[0] is req:
            self.waiting.popleft()
        else:
            self.waiting.remove(req)
        req.state = PREFILL
        if req.first_sched < 0:
            req.first_sched = self.now
        run = self.running
        if run and run[-1].id > req.id:
            bisect.insort(run, req, key=lambda r: r.id)
        else:
            run.append(req)
        added = self._add(req, tokens, True)
        if added == 0:  # pragma: no cover - the check above guarantees room
            raise KvBudgetError("admitted request got no KV")
        return True

    def _add(self, req, tokens: int, prefill: bool) -> int:
        if tokens <= 0 or req.id in self.in_step:
            return 0
        kv0 = req.kv_tokens
        got = self._grow(req, tokens)
        if got <= 0:
            return 0
        req.kv_tokens = kv0 + got
        self.in_step.add(req.id)
        self._items.append((req, got, prefill, kv0))
        return got

    def _decodes(self, reqs) -> list:
        out = []
        for r in list(reqs):
            if r.state != DECODE or r.id in self.in_step:
                continue
            while True:
                if self._add(r, 1, False):
                    out.append(r)
                    break
                if self.kv_policy != "preempt":  # pragma: no cover - reservations make room
                    raise KvBudgetError(f"no KV room for request {r.id}'s decode token")
                victim = self._youngest_unscheduled()
                if victim is None:
                    break  # every other running request is already in the step: r waits a step
                self._preempt(victim)
                if victim is r:
                    break
        return out

    def _youngest_unscheduled(self):
        for r in reversed(self.running):
            if r.id not in self.in_step:
                return r
        return None

    def _preempt(self, req) -> None:
        if req.id in self.in_step:
            raise RuntimeError("cannot pre-empt a request already in the step being formed")
        self.running.remove(req)
        req.recomputed += req.kv_tokens
        req.kv_tokens = 0
        self._free(req)
        req.target = req.prompt + req.generated
        req.preemptions += 1
        req.state = WAITING
        self.stats.preemptions += 1
        self.waiting.appendleft(req)

    # ----- engine interface ------------------------------------------------------------------------------
    def form_items(self, now: float) -> list:
        """Let the batching policy form the work of a step starting at ``now``: the list of
        ``(request, tokens, is_prefill, kv_before)`` items (empty = nothing to run now). The KV is
        allocated; timing the step is the caller's business (:meth:`next_step` for one GPU)."""
        self.now = now
        self._take_arrivals(now)
        self._items = []
        self.in_step = set()
        self.policy.schedule(self.builder)
        while not self._items and self.running and self.kv_policy == "preempt":
            # nothing fits (running prefills hold the memory): free the youngest and try again
            self._preempt(self.running[-1])
            self.in_step = set()
            self.policy.schedule(self.builder)
        if not self._items and self.running:
            raise RuntimeError("serving scheduler stalled with requests running")  # pragma: no cover
        return self._items

    def next_step(self, now: float):
        """The step to run now, or None when there is nothing to run until a request arrives."""
        items = self.form_items(now)
        if not items:
            return None
        kv = self.kv
        if kv.used > kv.peak:
            kv.peak = kv.used
        tokens = samples = prefill_tokens = 0
        ctx_sum = kv_sum = 0.0
        rows = []
        for r, n, pre, kv0 in items:
            tokens += n
            rows.append(r.rows(kv0, kv0 + n))
            if pre:
                prefill_tokens += n
                # causal: token i of the chunk attends to kv0 + i earlier positions
                ctx_sum += n * kv0 + n * (n - 1) / 2
                kv_sum += kv0 + n - 1
                if kv0 + n >= r.target:
                    samples += 1
            else:
                ctx_sum += kv0
                kv_sum += kv0
                samples += 1
        idx = self.steps
        self.plan.set_step(idx, rows[0] if len(rows) == 1 else np.concatenate(rows))
        tab = self.table
        dbase, dmb = tab.dense(tokens)
        tbase, tmb = tab.tail(tokens, samples)
        st = Step(idx, items, tokens, samples, tab.attention(ctx_sum, kv_sum), dbase, dmb, tbase, tmb,
                  prefill_tokens, now)
        s = self.stats
        s.step_tokens.append(tokens)
        s.step_seqs.append(len(items))
        s.step_prefill_tokens.append(prefill_tokens)
        s.step_kv_blocks.append(kv.used)
        s.step_start.append(now)
        self.step = st
        self.steps += 1
        return st

    def finish_step(self, now: float) -> None:
        """The current step ended at ``now``: advance its requests."""
        st = self.step
        stats = self.stats
        warm = self.warmup
        done = []
        for r, n, pre, kv0 in st.items:
            if pre:
                if r.kv_tokens < r.target:
                    continue  # a chunk of a longer prefill: no token yet
                r.state = DECODE
            r.generated += 1
            if r.first_token < 0:
                r.first_token = now
            elif r.id >= warm:
                stats.itl_s.append(now - r.last_token)
            r.last_token = now
            if r.generated >= r.output:
                done.append(r)
        for r in done:
            r.state = DONE
            r.finish = now
            self._free(r)
            self.running.remove(r)
            self.finished += 1
            stats.in_system_area += stats.in_system_n * (now - stats.in_system_t)
            stats.in_system_t = now
            stats.in_system_n -= 1
        self.step = None
