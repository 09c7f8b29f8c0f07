"""HOBBIT mixed-precision loading: fewer bytes than full-precision LRU at the same capacity."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from moesim.policies.cache.base import CacheSetup
from moesim.policies.cache.lru import Lru
from tests.conftest import ROOT

SC = ROOT / "scenarios" / "mixtral-8x7b-h100-lru-c96.yaml"


def run(*sets):
    return simulate(load_scenario(SC, ["workload.max_tokens=64", "workload.warmup_tokens=4", *sets])).summary


@settings(max_examples=8, deadline=None)
@given(cap=st.sampled_from([32, 64, 96, 160]), low=st.sampled_from([0.2, 0.4, 0.6]), dtype=st.sampled_from(["int4", "int8"]))
def test_hobbit_moves_fewer_bytes_than_full_precision_lru(cap, low, dtype):
    base = [f"policies.cache.capacity_experts={cap}"]
    full = run(*base)
    hob = run(*base, "policies.precision.kind=hobbit", f"policies.precision.low_threshold={low}",
              f"policies.precision.low_dtype={dtype}")
    assert hob["precision"]["low_precision_loads"] > 0
    assert hob["transfers"]["bytes_h2d"] < full["transfers"]["bytes_h2d"]
    assert 0 < hob["precision"]["gate_mass_low_fraction"] < 1


def test_zero_threshold_equals_full_precision():
    full = run()
    hob = run("policies.precision.kind=hobbit", "policies.precision.low_threshold=0")
    for k in ("tpot_ms", "cache", "transfers"):
        a, b = dict(full[k]), dict(hob[k])
        a.pop("prefetch_precision", None), b.pop("prefetch_precision", None)
        assert a == b, k
    assert hob["precision"]["low_precision_loads"] == 0 and hob["precision"]["gate_mass_low_fraction"] == 0


def test_skipped_experts_load_and_run_nothing():
    s = run("policies.precision.kind=hobbit", "policies.precision.low_threshold=0.45", "policies.precision.skip_threshold=0.45")
    p, c = s["precision"], s["cache"]
    assert p["skipped"] > 0 and p["low_precision_loads"] == 0
    assert p["gate_mass_skipped_fraction"] > 0
    assert s["transfers"]["copies"] == c["misses"] - p["skipped"]


def test_bad_thresholds_rejected():
    from moesim.errors import InputError

    with pytest.raises(InputError, match="skip_threshold"):
        load_scenario(SC, ["policies.precision.kind=hobbit", "policies.precision.skip_threshold=0.5", "policies.precision.low_threshold=0.2"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True),
                          st.lists(st.booleans(), min_size=3, max_size=3)), min_size=1, max_size=40),
       st.integers(2, 12))
def test_mixed_size_pool_never_overflows(accesses, slots):
    setup = CacheSetup(num_columns=3, num_experts=6, expert_bytes=100, top_k=1, model_layers=(0, 1, 2), max_distinct_per_step=3)
    lru = Lru(Lru.Config(capacity_experts=slots), setup)
    for t, (c, experts, small) in enumerate(accesses):
        sizes = {e: 25 for e, sm in zip(experts, small) if sm}
        r = lru.access(c, experts, t, sizes)
        pool = lru.pools[0]
        assert pool.used_bytes == sum(lru.key_bytes[k] for k in pool.order) <= pool.capacity_bytes
        for e, _ in r.loads:
            assert lru.key_bytes[c * 6 + e] == sizes.get(e, 100)


def _cache_kinds():
    from moesim.policies.base import registry

    return sorted(k for k in registry("cache") if k not in ("all_resident", "streaming"))


@pytest.mark.parametrize("kind", _cache_kinds())
def test_every_cache_policy_takes_mixed_precision_loads(kind):
    s = run(f"policies.cache.kind={kind}", "policies.cache.capacity_experts=96", "policies.precision.kind=hobbit")
    assert s["precision"]["low_precision_loads"] > 0
    assert s["memory"]["expert_cache_bytes"] == 96 * s["transfers"]["expert_bytes"]
