"""CPU expert execution in detail: threads per expert, vector/matrix units, NUMA placement and
concurrent expert workers sharing DRAM bandwidth.

One expert computed by ``t`` threads (a *worker*) takes, alone,

    T = max( FLOPs / (t x per-core peak of the unit x compute_efficiency),
             bytes read from node j / node bandwidth            (every NUMA node j),
             bytes node i's threads read remotely / cross-socket rate   (every node i),
             bytes node i's threads read / (threads on i x core bandwidth) )

Decode-time expert math is bound by the DRAM terms. Weights are the bytes (times the CPU's
``weight_passes`` for the dtype: a framework that re-lays the weights out on every call reads and
writes them more than once); activations are left out (kilobytes against hundreds of megabytes).
With ``overlap_compute_and_memory: false`` the FLOP term and the longest read term add instead of
taking the larger, and ``call_overhead_us`` is added to every call (both only for the thread
roofline; measured tables and the aggregate times already hold them).

The cores are cut into ``cores // t`` workers: a worker with no more threads than a NUMA node has
cores stays inside one node; a larger one spans ``ceil(t / cores_per_node)`` consecutive nodes,
its threads split evenly. A worker splits an expert's rows over its threads, so the threads on
node i read their share of the weights.

Where the weights live (``placement``):

* ``interleave`` — every expert's pages are spread evenly over all nodes (``numactl
  --interleave=all``, the usual default of a process that spans sockets): each thread reads
  1/N of its share from each node, (N-1)/N of it remotely.
* ``node_local`` — each expert sits whole on one home node, the experts of a layer dealt round
  robin (home = (layer column x experts + expert) mod nodes); a released job takes a free worker
  on its home node when there is one. Otherwise (and under the other placements) a job takes the
  free worker whose nodes run the fewest jobs, the lowest index on ties.
* ``node_sharded`` — kTransformers' NUMA-aware tensor parallelism: every expert's rows are cut
  into one shard per node, each in that node's memory; the threads on a node compute its local
  shard, so a worker spanning all nodes reads only locally. Shards on nodes the worker does not
  span are read remotely, split evenly over its threads' nodes.

Reads from another NUMA node of the *same* socket (SNC / NPS sub-nodes) pay no cross-socket
penalty; only reads across sockets go through ``cross_socket_bandwidth_gb_s``.

Concurrent workers share each node's bandwidth and each node's cross-socket port: while jobs run
together, a job's speed is its alone-speed times the smallest ``capacity / demand`` over the
resources it uses (demand = what all running jobs would draw at alone-speed; 1 when under
capacity), a proportional-share fluid model recomputed whenever a job starts or ends. While a
host-to-device copy runs, every CPU job runs at ``1 / f_dram`` speed (the DMA reads the same
DRAM; the engine's existing sharing rule). Times are seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moesim.errors import InputError

PLACEMENTS = ("interleave", "node_local", "node_sharded")
UNITS = ("auto", "avx2", "avx512", "amx")
#: expert dtypes whose aggregate ("auto") CPU rate is peak_gflops_bf16 (the others use fp32)
_BF16_PEAK_DTYPES = ("bf16", "fp16", "fp8", "int8", "int4")


@dataclass(frozen=True)
class Worker:
    """A group of ``threads`` threads that computes one expert at a time on NUMA ``nodes``."""

    nodes: tuple
    threads_on: tuple  # threads on each of ``nodes``


def per_core_gflops(cpu, dtype: str, unit: str) -> float:
    """Per-core peak GFLOP/s used for ``dtype`` experts on ``unit`` (``auto``: the CPU's aggregate
    peak of the dtype over its cores). Raises InputError when the unit is missing or cannot run
    the dtype."""
    if unit == "auto":
        peak = cpu.peak_gflops_bf16 if dtype in _BF16_PEAK_DTYPES else cpu.peak_gflops_fp32
        return peak / cpu.cores
    u = cpu.units.get(unit)
    if u is None:
        have = ", ".join(sorted(cpu.units)) or "none"
        raise InputError(f"the CPU has no {unit!r} unit (hardware.cpu.units lists: {have})",
                         field="policies.execution.cpu_unit")
    rate = u.for_dtype(dtype)
    if rate is None:
        raise InputError(f"unit {unit!r} of this CPU has no rate for {dtype} experts",
                         field="policies.execution.cpu_unit")
    return rate


def make_workers(cpu, threads: int) -> list[Worker]:
    """The expert workers ``threads``-thread experts get on ``cpu`` (see the module docstring)."""
    if threads > cpu.cores:
        raise InputError(f"threads_per_expert {threads} exceeds the CPU's {cpu.cores} cores",
                         field="policies.execution.threads_per_expert")
    cpn, nodes = cpu.cores_per_node, cpu.numa_nodes
    if threads <= cpn:
        return [Worker((j,), (threads,)) for j in range(nodes) for _ in range(cpn // threads)]
    k = -(-threads // cpn)
    out = []
    for w in range(nodes // k):
        span = tuple(range(w * k, w * k + k))
        base, extra = divmod(threads, k)
        out.append(Worker(span, tuple(base + (1 if i < extra else 0) for i in range(k))))
    return out


class CpuExpertModel:
    """Times of experts computed on the host CPU by ``threads``-thread workers (see module doc).

    ``legacy_times[n]``: the aggregate model's time of one expert with n tokens (measured table or
    roofline over all cores and the whole DRAM bandwidth); used as the alone-time when
    ``threads`` is None (all cores on one expert) and ``unit`` is ``auto``. ``table_times[n]``: a measured table at exactly
    ``threads`` threads, preferred over the roofline when the unit is ``auto``.
    """

    def __init__(self, model, cpu, *, threads: int | None, unit: str = "auto", placement: str = "interleave",
                 legacy_times=None, table_times=None, num_experts: int = 1):
        self.cpu = cpu
        self.placement = placement
        self.unit = unit
        # the aggregate model's times hold the aggregate peak: only for unit auto (a named unit's
        # per-core peak x all cores goes through the thread roofline)
        self.legacy = legacy_times if threads is None and unit == "auto" else None
        self.threads = cpu.cores if threads is None else threads
        self.workers = make_workers(cpu, self.threads)
        if threads is None:  # the aggregate model: one worker on every node
            self.workers = [Worker(tuple(range(cpu.numa_nodes)),
                                   tuple(cpu.cores_per_socket // cpu.numa_nodes_per_socket for _ in range(cpu.numa_nodes)))]
        self.table = table_times if unit == "auto" else None
        self.E = num_experts
        self.dtype = model.expert_dtype or model.dtype
        # DRAM traffic of one call: the weights times the passes the framework makes over them
        self.nbytes = float(model.expert_bytes) * cpu.passes(self.dtype)
        self.flops1 = float(model.expert_flops(1))
        self.serial = not cpu.overlap_compute_and_memory
        self.c0 = (cpu.call_overhead_us or 0.0) * 1e-6
        self.pcp = per_core_gflops(cpu, self.dtype, unit) * 1e9 * cpu.compute_efficiency
        self.node_bw = cpu.node_bandwidth * 1e9
        self.cross_bw = None if cpu.cross_socket_bandwidth_gb_s is None else cpu.cross_socket_bandwidth_gb_s * 1e9
        self.core_bw = None if cpu.core_bandwidth_gb_s is None else cpu.core_bandwidth_gb_s * 1e9
        self.nps = cpu.numa_nodes_per_socket
        self.N = cpu.numa_nodes
        self._cache: dict = {}

    # ----- one expert, alone ------------------------------------------------------------------------
    def home(self, key: int) -> int:
        """Home node of expert ``key`` (= column x experts + expert) under ``node_local``."""
        return key % self.N

    def reads(self, w: Worker, home: int | None, size: float = 1.0) -> tuple[dict, dict, dict]:
        """Bytes one expert job on worker ``w`` reads: per source node, per reading node from
        other sockets, and per reading node in all (``size`` scales the expert's bytes)."""
        B = self.nbytes * size
        t = sum(w.threads_on)
        from_node: dict = {}
        remote_in: dict = {}
        by_group: dict = {}
        k = len(w.nodes)
        for i, ti in zip(w.nodes, w.threads_on):
            Bi = B * ti / t
            if self.placement == "interleave":
                src = [(j, Bi / self.N) for j in range(self.N)]
            elif self.placement == "node_sharded":
                shard = B / self.N  # its own node's shard, plus a share of the shards off its nodes
                src = [(i, shard)] + [(j, shard / k) for j in range(self.N) if j not in w.nodes]
                Bi = sum(b for _, b in src)
            else:
                src = [(home, Bi)]
            by_group[i] = Bi
            for j, b in src:
                from_node[j] = from_node.get(j, 0.0) + b
                if j // self.nps != i // self.nps:
                    remote_in[i] = remote_in.get(i, 0.0) + b
        return from_node, remote_in, by_group

    def alone(self, tokens: int, w: Worker, home: int | None = None, size: float = 1.0) -> tuple[float, dict]:
        """(seconds, {resource: bytes}) of one expert with ``tokens`` tokens alone on worker ``w``;
        resources are ``("mem", node)`` and ``("xin", node)``."""
        ck = (tokens, w, home if self.placement == "node_local" else None, size)
        got = self._cache.get(ck)
        if got is not None:
            return got
        from_node, remote_in, by_group = self.reads(w, home, size)
        roof = False  # the thread roofline (not a measured table nor the aggregate model's times)
        if self.legacy is not None:
            T = self.legacy[tokens] * size
        else:
            T = self.flops1 * size * tokens / (sum(w.threads_on) * self.pcp)
            roof = self.table is None
            if self.table is not None:
                T = self.table[tokens] * size
        Tm = 0.0  # the longest DRAM / cross-socket / per-core read term
        for j, b in from_node.items():
            Tm = max(Tm, b / self.node_bw)
        if self.cross_bw is not None:
            for b in remote_in.values():
                Tm = max(Tm, b / self.cross_bw)
        if self.core_bw is not None:
            for i, ti in zip(w.nodes, w.threads_on):
                Tm = max(Tm, by_group[i] / (ti * self.core_bw))
        if roof:  # CpuSpec: arithmetic and weight streaming overlap (max) or add; fixed per-call cost
            T = (T + Tm if self.serial else max(T, Tm)) + self.c0
        else:
            T = max(T, Tm)
        dem = {("mem", j): b for j, b in from_node.items()}
        if self.cross_bw is not None:
            dem.update({("xin", i): b for i, b in remote_in.items()})
        got = (T if tokens > 0 else 0.0, dem)
        self._cache[ck] = got
        return got

    def times(self, n_max: int) -> list:
        """Alone-time of one expert on the first worker for 0..n_max tokens (node-local home)."""
        w = self.workers[0]
        return [self.alone(n, w, w.nodes[0])[0] for n in range(n_max + 1)]

    def capacity(self, res) -> float:
        """Bytes/s of a shared resource."""
        return self.node_bw if res[0] == "mem" else self.cross_bw

    def describe(self) -> str:
        """One line for summary.json: how CPU expert times are modelled."""
        alone = ("aggregate times" if self.legacy is not None
                 else f"table at {self.threads} threads" if self.table is not None else "thread roofline")
        return (f"CPU workers: {self.threads} threads/expert, {len(self.workers)} worker(s), unit {self.unit}, "
                f"{self.N} NUMA node(s), {self.placement}, {alone}")

    # ----- a batch of jobs on the workers -------------------------------------------------------------
    def schedule(self, jobs, free: list, copies=(), f_dram: float = 1.0, scale=None) -> list:
        """Run ``jobs`` = [(release_s, tokens, key, size)] (in priority order) on the workers whose
        free times are ``free`` (updated in place). ``copies``: (start, end) of host-to-device copies
        (CPU jobs run at 1/``f_dram`` speed under them); ``scale``: optional per-job multipliers of
        the alone-time. Returns [(start, end, worker index)] per job."""
        n = len(jobs)
        out = [None] * n
        if n == 0:
            return out
        workers = self.workers
        W = len(workers)
        pending = list(range(n))
        running: dict = {}  # job -> [worker, remaining work (1 = all), alone-time, demand]
        busy = [False] * W
        starts = [0.0] * n
        bounds = []
        if f_dram != 1.0:
            for cs, ce in copies:
                bounds.append(cs)
                bounds.append(ce)
            bounds.sort()
        t = max(min(j[0] for j in jobs), min(free))  # the first moment a job and a worker meet
        while pending or running:
            # released jobs, in priority order, take free workers (a node_local job prefers a
            # worker on its home node)
            for idx in list(pending):
                if jobs[idx][0] > t:
                    continue
                cands = [w for w in range(W) if not busy[w] and free[w] <= t]
                if not cands:
                    break
                on_node: dict = {}  # running jobs per node: spread work over the nodes' memories
                for v in running.values():
                    for j in workers[v[0]].nodes:
                        on_node[j] = on_node.get(j, 0) + 1
                w = min(cands, key=lambda x: (sum(on_node.get(j, 0) for j in workers[x].nodes), x))
                if self.placement == "node_local":
                    h = self.home(jobs[idx][2])
                    for x in cands:
                        if h in workers[x].nodes:
                            w = x
                            break
                pending.remove(idx)
                rel, tok, key, size = jobs[idx]
                T, dem = self.alone(tok, workers[w], self.home(key), size)
                if scale is not None:
                    T *= scale[idx]
                starts[idx] = t
                if T <= 0.0:
                    out[idx] = (t, t, w)
                    continue
                running[idx] = [w, 1.0, T, dem]
                busy[w] = True
            if not running:
                if not pending:
                    break
                nxt = min(jobs[i][0] for i in pending)
                idle_free = min(free[w] for w in range(W) if not busy[w])
                t = max(nxt, idle_free)
                continue
            # speeds under sharing and copies
            load: dict = {}
            for _, _, T, dem in running.values():
                for r, b in dem.items():
                    load[r] = load.get(r, 0.0) + b / T
            slow = 1.0
            if bounds:
                for cs, ce in copies:
                    if cs <= t < ce:
                        slow = f_dram
                        break
            speed = {}
            for j, (_, _, T, dem) in running.items():
                f = 1.0
                for r in dem:
                    c = self.capacity(r) / load[r]
                    if c < f:
                        f = c
                speed[j] = f / (T * slow)
            # next event
            dt = math.inf
            for j, v in running.items():
                d = v[1] / speed[j]
                if d < dt:
                    dt = d
            if pending:
                for i in pending:
                    if t < jobs[i][0] < t + dt:
                        dt = jobs[i][0] - t
                for w in range(W):
                    if not busy[w] and t < free[w] < t + dt:
                        dt = free[w] - t
            if bounds:
                for b in bounds:
                    if t < b < t + dt:
                        dt = b - t
                        break
            t_new = t + dt
            done = []
            for j, v in running.items():
                if v[1] / speed[j] <= dt * (1 + 1e-12):
                    done.append(j)
                else:
                    v[1] -= speed[j] * dt
            t = t_new
            for j in done:
                w = running.pop(j)[0]
                busy[w] = False
                free[w] = t
                out[j] = (starts[j], t, w)
        return out


def cpu_expert_model(model, hw, cfg, legacy_times, table_for_threads, num_experts: int):
    """The :class:`CpuExpertModel` of an execution-policy config (``threads_per_expert``,
    ``cpu_unit``, ``numa_placement``); ``table_for_threads(t)`` gives a measured table's times at
    t threads or None."""
    threads = getattr(cfg, "threads_per_expert", None)
    unit = getattr(cfg, "cpu_unit", "auto")
    placement = getattr(cfg, "numa_placement", "interleave")
    table = table_for_threads(threads) if threads is not None and unit == "auto" else None
    return CpuExpertModel(model, hw.cpu, threads=threads, unit=unit, placement=placement,
                          legacy_times=np.asarray(legacy_times, dtype=float), table_times=table,
                          num_experts=num_experts)
