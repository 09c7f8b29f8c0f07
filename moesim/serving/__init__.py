"""The serving layer: requests arriving over time on the single-GPU engine.

``workload.requests`` (:mod:`moesim.serving.config`) describes the arrivals and lengths
(:mod:`moesim.serving.arrivals`); :mod:`moesim.serving.requests` maps each request's token positions
to trace rows; :mod:`moesim.serving.scheduler` forms each engine step with a batching policy
(``moesim/policies/batching/``) under the KV-memory budget; :mod:`moesim.serving.metrics` turns the
finished requests into TTFT / TPOT / e2e percentiles, goodput and ``requests.parquet``.

On a cluster the same requests, policies and metrics run in request-level models over step-cost
tables measured by the expert-parallel engine (:mod:`moesim.serving.cluster_tables`):
:mod:`moesim.serving.pd_disagg` (disaggregated prefill/decode) and :mod:`moesim.serving.ep_serving`
(co-located, attention-FFN disaggregated, elastic).
"""
