"""Host-side memory tiers of the experts' home copies: pinned DRAM, pageable DRAM, storage.

HBM holds the expert cache; every expert also has a home copy off the GPU. With
``hardware.host_memory.pinned_capacity_gib`` set, that home copy is split by how fast it can reach
the GPU: the most popular experts (by how often the replayed trace routes to them, over all its
rows; ties to the lower layer-major key) are pinned until ``pinned_capacity_gib`` is full, the next
ones live in pageable DRAM until DRAM (``capacity_gib``, the pinned part included) is full, and the
rest live on ``hardware.storage``. A load copies from pinned memory at the link's pinned rate; from
pageable memory at the size-dependent pageable rate, blocking the host thread as a pageable copy
does; from storage by a read into a pinned bounce buffer and then a pinned-rate copy (or one direct
transfer with GPUDirect), as ``runtime.expert_store: ssd`` does for every expert. Popularity is a
profile taken on the replayed routing itself, as an offline placement would (an upper bound on
what a profile from other traffic gives).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.errors import InputError

GIB = 2**30
TIER_NAMES = ("pinned", "pageable", "ssd")


@dataclass
class Tiers:
    """Where each expert's home copy lives: ``tier_of[key]`` (0 pinned, 1 pageable, 2 storage, key
    = ``column * num_experts + expert``), with the bytes and experts of each tier."""

    tier_of: list
    bytes: dict
    experts: dict

    def summary(self) -> dict:
        """``{tier: {experts, bytes}}`` for ``summary.json``'s ``memory.tiers``."""
        return {n: {"experts": int(self.experts[n]), "bytes": int(self.bytes[n])} for n in TIER_NAMES}


def popularity(experts, col_src, num_experts: int) -> np.ndarray:
    """Routed-token count of every key (``column * num_experts + expert``) over the trace rows
    ``experts`` ``[T, L, K]``, column ``c`` replaying trace column ``col_src[c]``."""
    counts = np.zeros((len(col_src), num_experts), dtype=np.int64)
    for c, src in enumerate(col_src):
        col = np.asarray(experts[:, src]).reshape(-1)
        counts[c] = np.bincount(col[col >= 0].astype(np.int64), minlength=num_experts)[:num_experts]
    return counts.reshape(-1)


def assign_tiers(counts, key_bytes, *, pinned_bytes: float, dram_bytes: float, storage_bytes: float | None,
                 source: str = "scenario", no_storage: str = "need hardware.storage") -> Tiers:
    """Fill pinned, then pageable DRAM, then storage with keys in order of ``counts`` (most routed
    first, stable); ``storage_bytes`` None = no storage (an InputError naming the numbers when DRAM
    cannot hold the rest)."""
    order = np.argsort(-np.asarray(counts), kind="stable")
    kb = np.asarray(key_bytes, dtype=np.int64)
    tier_of = [2] * len(kb)
    used = [0, 0, 0]
    n = [0, 0, 0]
    t = 0
    pinned_bytes = min(pinned_bytes, dram_bytes)  # pinned pages are DRAM too
    for key in order.tolist():
        b = int(kb[key])
        # a tier, once full, stays closed: the popularity order is kept across the tiers
        if t == 0 and used[0] + b > pinned_bytes:
            t = 1
        if t == 1 and used[0] + used[1] + b > dram_bytes:
            t = 2
        tier_of[key] = t
        used[t] += b
        n[t] += 1
    if used[2]:
        total = int(kb.sum())
        if storage_bytes is None:
            raise InputError(
                f"experts need {total / GIB:.2f} GiB of home copies, host DRAM holds {dram_bytes / GIB:.2f} GiB "
                f"({pinned_bytes / GIB:.2f} GiB pinned); {used[2] / GIB:.2f} GiB left over {no_storage}",
                source=source, field="hardware.host_memory.capacity_gib",
            )
        if used[2] > storage_bytes:
            raise InputError(
                f"{used[2] / GIB:.2f} GiB of experts overflow DRAM onto storage of {storage_bytes / GIB:.2f} GiB",
                source=source, field="hardware.storage.capacity_gib",
            )
    return Tiers(tier_of, dict(zip(TIER_NAMES, used)), dict(zip(TIER_NAMES, n)))


def resolve_tiers(scenario, memory: dict, experts, col_src, key_bytes=None, source: str = "scenario") -> Tiers | None:
    """The run's tiers when ``hardware.host_memory.pinned_capacity_gib`` is set (None otherwise, or
    when ``runtime.expert_store: ssd`` puts every expert on storage); updates ``memory``
    (``expert_store`` becomes ``dram`` or ``dram+ssd``, ``memory.tiers`` the split). ``key_bytes``:
    per-key home-copy bytes (default: the model's expert bytes each)."""
    hw, rt, m = scenario.hardware, scenario.runtime, scenario.model
    cap = hw.host_memory.pinned_capacity_gib
    if cap is None or rt.expert_store == "ssd":
        return None
    fld = "hardware.host_memory.pinned_capacity_gib"
    if cap > hw.host_memory.capacity_gib:  # pinned pages are DRAM: no more can be pinned than there is
        raise InputError(f"{cap:g} GiB pinned is more than the host's {hw.host_memory.capacity_gib:g} GiB of DRAM "
                         "(hardware.host_memory.capacity_gib)", source=source, field=fld)
    if hw.gpu.unified_memory:
        raise InputError("memory tiers need a discrete GPU (this one shares DRAM with the CPU)", source=source, field=fld)
    if rt.host_memory != "pinned":
        raise InputError("runtime.host_memory: pageable pins nothing; use pinned with a pinned capacity "
                         "(0 = every expert pageable)", source=source, field=fld)
    n_keys = len(col_src) * m.num_experts
    kb = [m.expert_bytes] * n_keys if key_bytes is None else list(key_bytes)
    counts = popularity(experts, col_src, m.num_experts)
    storage = None if rt.expert_store == "dram" or hw.storage is None else hw.storage.capacity_gib * GIB
    tiers = assign_tiers(counts, kb, pinned_bytes=cap * GIB, dram_bytes=hw.host_memory.capacity_gib * GIB,
                         storage_bytes=storage, source=source,
                         no_storage="need storage (runtime.expert_store: auto)" if hw.storage is not None
                         else "need hardware.storage")
    b = tiers.bytes
    memory["expert_store"] = "dram+ssd" if b["ssd"] else "dram"
    memory["host_expert_bytes"] = int(b["pinned"] + b["pageable"])
    memory["ssd_expert_bytes"] = int(b["ssd"])
    memory["tiers"] = tiers.summary()
    return tiers
