"""Streaming never keeps an expert; all-resident never misses."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.policies.cache.all_resident import AllResident
from moesim.policies.cache.base import CacheSetup
from moesim.policies.cache.streaming import Streaming

steps = st.lists(st.lists(st.lists(st.integers(0, 7), min_size=1, max_size=4, unique=True), min_size=3, max_size=3), min_size=1, max_size=30)


def _setup():
    return CacheSetup(num_columns=3, num_experts=8, expert_bytes=100, top_k=2, model_layers=(0, 1, 2), max_distinct_per_step=4)


@settings(max_examples=100, deadline=None)
@given(steps)
def test_streaming_every_access_is_a_streamed_miss(trace):
    pol = Streaming(Streaming.Config(transient_buffers=3), _setup())
    assert pol.transient_buffer_count() == 3 and pol.resident_slots_bytes() == 0
    for t, step in enumerate(trace):
        for c, needed in enumerate(step):
            r = pol.access(c, needed, t)
            assert r.hits == [] and r.loads == [] and r.streamed == list(needed)
    assert pol.resident == {}


@settings(max_examples=100, deadline=None)
@given(steps)
def test_all_resident_every_access_is_a_hit(trace):
    pol = AllResident(AllResident.Config(), _setup())
    assert pol.slots_total() == 24 and pol.transient_buffer_count() == 0
    for t, step in enumerate(trace):
        for c, needed in enumerate(step):
            r = pol.access(c, needed, t)
            assert r.hits == list(needed) and r.loads == [] and r.streamed == []
