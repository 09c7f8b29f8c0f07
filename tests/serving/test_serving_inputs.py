"""Serving inputs: arrival processes, arrival files (Azure LLM inference trace layout), length
distributions, trace-row mapping, the scenario schema and the CLI's requests.parquet."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from moesim.cli import main
from moesim.config.loader import load_scenario, resolved_dict, scenario_from_dict, scenario_hash
from moesim.engine.build import prepare
from moesim.errors import InputError
from moesim.serving.arrivals import make_arrivals
from moesim.serving.config import RequestsConfig
from tests.conftest import ROOT
from tests.serving.common import poisson, request_trace, run, scenario


def _cfg(**kw) -> RequestsConfig:
    return RequestsConfig.model_validate(kw)


def test_poisson_and_gamma_inter_arrivals():
    p = make_arrivals(_cfg(arrival={"kind": "poisson", "rate_per_s": 4.0}, num_requests=20000), seed=1)
    gaps = np.diff(np.r_[0.0, p.time_s])
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)
    g = make_arrivals(_cfg(arrival={"kind": "gamma", "rate_per_s": 4.0, "cv": 3.0}, num_requests=20000), seed=1)
    gaps = np.diff(np.r_[0.0, g.time_s])
    assert gaps.mean() == pytest.approx(0.25, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.1)
    again = make_arrivals(_cfg(arrival={"kind": "gamma", "rate_per_s": 4.0, "cv": 3.0}, num_requests=20000), seed=1)
    assert np.array_equal(g.time_s, again.time_s)


def test_duration_and_count_bound_the_arrivals():
    d = make_arrivals(_cfg(arrival={"kind": "poisson", "rate_per_s": 10.0}, duration_s=5.0), seed=0)
    assert d.time_s.max() < 5.0 and 30 < len(d) < 80
    both = make_arrivals(_cfg(arrival={"kind": "poisson", "rate_per_s": 10.0}, duration_s=5.0, num_requests=7), seed=0)
    assert len(both) == 7
    with pytest.raises(ValueError, match="num_requests or duration_s"):
        _cfg(arrival={"kind": "poisson", "rate_per_s": 1.0})


def test_length_distributions():
    c = _cfg(arrival={"kind": "poisson", "rate_per_s": 1.0}, num_requests=5000,
             prompt_tokens={"dist": "uniform", "low": 10, "high": 20},
             output_tokens={"dist": "lognormal", "median": 100, "sigma": 0.5, "max": 400})
    a = make_arrivals(c, seed=3)
    assert a.prompt.min() == 10 and a.prompt.max() == 20
    assert np.median(a.output) == pytest.approx(100, rel=0.05) and a.output.max() <= 400
    fixed = make_arrivals(_cfg(arrival={"kind": "poisson", "rate_per_s": 1.0}, num_requests=3, prompt_tokens=7), seed=0)
    assert fixed.prompt.tolist() == [7, 7, 7]


def test_azure_trace_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "AzureLLMInferenceTrace_code.csv"
    csv_path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
        "2023-11-16 18:15:51.2000000,879,0\n",
        encoding="utf-8",
    )
    a = make_arrivals(_cfg(arrival={"kind": "trace", "path": str(csv_path)}), seed=0)
    assert a.time_s.tolist() == pytest.approx([0.0, 4.314579, 4.5194100])
    assert a.prompt.tolist() == [374, 396, 879]
    assert a.output.tolist() == [44, 109, 1]  # zero output raised to one token
    half = make_arrivals(_cfg(arrival={"kind": "trace", "path": str(csv_path), "time_scale": 0.5}, num_requests=2), seed=0)
    assert half.time_s.tolist() == pytest.approx([0.0, 2.1572895])
    jl = tmp_path / "arr.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in [
        {"arrival_s": 2.0, "prompt_tokens": 5, "output_tokens": 3},
        {"arrival_s": 1.0, "prompt_tokens": 6, "output_tokens": 2},
    ]) + "\n", encoding="utf-8")
    b = make_arrivals(_cfg(arrival={"kind": "trace", "path": str(jl)}), seed=0)
    assert b.time_s.tolist() == [0.0, 1.0] and b.prompt.tolist() == [6, 5]
    bad = tmp_path / "bad.csv"
    bad.write_text("when,prompt\n1,2\n", encoding="utf-8")
    with pytest.raises(InputError, match="arrival time"):
        make_arrivals(_cfg(arrival={"kind": "trace", "path": str(bad)}), seed=0)


def test_trace_file_arrivals_run(tmp_path):
    p = tmp_path / "arr.csv"
    p.write_text("arrival_s,prompt_tokens,output_tokens\n0.0,8,4\n0.0001,12,6\n0.0002,4,1\n", encoding="utf-8")
    out = run(scenario({"arrival": {"kind": "trace", "path": str(p)}}))
    s = out.summary["serving"]
    assert s["finished_requests"] == 3 and s["arrival"] == "trace" and s["rate_per_s"] is None
    assert out.requests.column("output_tokens").to_pylist() == [4, 6, 1]


def test_requests_replay_their_trace_rows(tmp_path):
    request_trace(tmp_path / "req.npz", [5, 9, 3], [4, 0, 7])
    out = run(scenario(poisson(100.0, 5), trace=tmp_path / "req.npz"))
    sv = out.prepared.serving
    assert sv.routing_rows == "by_request"
    got = [(r.source, r.prompt, r.output) for r in sv.requests]
    assert got == [(0, 5, 5), (1, 9, 1), (2, 3, 8), (0, 5, 5), (1, 9, 1)]  # cycled; O = decode rows + 1
    assert "request ids ignored" not in out.summary["routing_note"]
    # windows: each request a contiguous (wrapping) window of rows
    win = run(scenario(poisson(100.0, 5, routing_rows="windows"), trace=tmp_path / "req.npz"))
    r0 = win.prepared.serving.requests[0]
    T = 5 + 9 + 3 + 4 + 0 + 7
    assert r0.rows(0, 4).tolist() == [(r0.source + i) % T for i in range(4)]


def test_old_scenarios_keep_their_hash_and_serving_blocks_are_validated():
    sc = load_scenario(ROOT / "scenarios" / "mixtral-8x7b-h100-lru-c96.yaml")
    d = resolved_dict(sc)
    assert "batching" not in d["policies"] and "requests" not in d["workload"]
    with pytest.raises(InputError, match="batching needs workload.requests"):
        load_scenario(ROOT / "scenarios" / "mixtral-8x7b-h100-lru-c96.yaml", ["policies.batching.kind=static"])
    # a cluster with requests is co-located serving now (moesim.serving.ep_serving), no longer refused
    ep = load_scenario(ROOT / "scenarios" / "mixtral-8x22b-ep8-direct.yaml",
                       ["workload.requests={arrival: {kind: poisson, rate_per_s: 1}, num_requests: 2}"])
    assert ep.parallel.prefill_gpus is None and "cluster_table_tokens" not in resolved_dict(ep)["workload"]["requests"]
    sv = load_scenario(ROOT / "scenarios" / "mixtral-8x7b-h100-lru-c96.yaml",
                       ["workload.requests={arrival: {kind: poisson, rate_per_s: 1}, num_requests: 2}"])
    assert sv.policies.batching.kind == "continuous"  # the default batching of a serving run
    assert scenario_hash(sv, "x") != scenario_hash(sc, "x")
    with pytest.raises(InputError, match="belady"):
        prepare(load_scenario(ROOT / "scenarios" / "mixtral-8x7b-h100-belady-c96.yaml",
                              ["workload.requests={arrival: {kind: poisson, rate_per_s: 1}, num_requests: 2}"]))


def test_arrival_file_path_is_relative_to_the_scenario_and_hashed_by_content(tmp_path):
    (tmp_path / "arr.csv").write_text("arrival_s,prompt_tokens,output_tokens\n0,8,4\n", encoding="utf-8")
    d = scenario({"arrival": {"kind": "trace", "path": "arr.csv"}})
    sc = scenario_from_dict(d, base_dir=tmp_path)
    assert sc.workload.requests.arrival.path == str((tmp_path / "arr.csv").resolve())
    h1 = scenario_hash(sc, None)
    (tmp_path / "arr.csv").write_text("arrival_s,prompt_tokens,output_tokens\n0,8,5\n", encoding="utf-8")
    assert scenario_hash(sc, None) != h1


@pytest.mark.parametrize("name", ["mixtral-8x7b-h100-lru-c96-poisson", "mixtral-8x7b-h100-kv-vs-cache",
                                  "mixtral-8x7b-h100-continuous", "mixtral-8x7b-h100-static"])
def test_bundled_serving_scenarios_write_requests_parquet(name, tmp_path, capsys):
    out = tmp_path / name
    assert main(["run", str(ROOT / "scenarios" / f"{name}.yaml"), "--out", str(out),
                 "--set", "workload.requests.num_requests=12"]) == 0
    text = capsys.readouterr().out
    assert "serving" in text and "TTFT" in text
    s = json.loads((out / "summary.json").read_text())
    t = pq.read_table(out / "requests.parquet")
    assert t.num_rows == s["serving"]["finished_requests"] == s["requests"] == 12
    assert {"arrival_s", "first_token_s", "finish_s", "prompt_tokens", "output_tokens", "preemptions"} <= set(t.column_names)
    a = t.to_pydict()
    assert all(f >= ft >= ar for ar, ft, f in zip(a["arrival_s"], a["first_token_s"], a["finish_s"]))
    for k in ("ttft_ms", "e2e_ms", "tpot_ms"):
        assert s[k] is not None and s[k]["p99"] >= s[k]["p50"] > 0
    assert s["serving"]["kv"]["peak_bytes"] <= s["serving"]["kv"]["budget_bytes"]
