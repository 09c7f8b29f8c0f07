"""``moesim trace cache-curve`` and :mod:`moesim.policies.cache.curve`: counts equal the engine's,
table / JSON / HTML output, and one-line input errors."""

from __future__ import annotations

import json

import pytest

from moesim.cli import main
from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from moesim.errors import InputError
from moesim.policies.cache.curve import hit_curve
from tests.conftest import ROOT

TRACE = ROOT / "traces" / "mixtral-8x7b-synth.npz"
SCEN = ROOT / "scenarios" / "mixtral-8x7b-h100-lru-c96.yaml"
NEW_KINDS = ["lfu", "fifo", "arc", "belady", "hybrimoe_mrs", "fate", "hobbit", "expertflow_plec", "moe_infinity"]


@pytest.fixture(scope="module")
def curve64():
    return hit_curve(TRACE, ["lru"] + NEW_KINDS, [96], max_tokens=64)


@pytest.mark.parametrize("kind", ["lru"] + NEW_KINDS)
def test_engine_hits_equal_the_curve(kind, curve64):
    sc = load_scenario(SCEN, [f"policies.cache.kind={kind}", "policies.cache.capacity_experts=96",
                              "workload.max_tokens=64", "workload.warmup_tokens=0"])
    s = simulate(sc).summary
    row = next(r for r in curve64["results"] if r["policy"] == kind)
    assert s["cache"]["policy"] == kind
    assert (s["cache"]["hits"], s["cache"]["misses"]) == (row["hits"], row["misses"])


@pytest.mark.parametrize("kind", ["lru", "belady"])
def test_engine_equals_curve_with_warmup_and_per_layer(kind):
    sc = load_scenario(SCEN, [f"policies.cache.kind={kind}", "policies.cache.capacity_experts=64",
                              "policies.cache.scope=per_layer", "workload.max_tokens=48",
                              "workload.warmup_tokens=8"])
    s = simulate(sc).summary
    c = hit_curve(TRACE, [kind], [64], scope="per_layer", max_tokens=48, warmup_tokens=8)
    r = c["results"][0]
    assert (s["cache"]["hits"], s["cache"]["misses"]) == (r["hits"], r["misses"])


def test_belady_bounds_every_online_policy_on_the_bundled_trace():
    c = hit_curve(TRACE, ["belady", "lru", "lfu", "fifo", "arc", "hybrimoe_mrs", "hobbit", "moe_infinity",
                          "expertflow_plec"], [32, 96, 160], max_tokens=128)
    best = {r["capacity"]: r["hits"] for r in c["results"] if r["policy"] == "belady"}
    for r in c["results"]:
        assert r["hits"] <= best[r["capacity"]], r
        assert r["hits"] + r["misses"] == r["accesses"] == 128 * 32 * 2


def test_cli_table_json_and_html(tmp_path, capsys):
    out = tmp_path / "curve.html"
    assert main(["trace", "cache-curve", str(TRACE), "--policies", "lru,belady", "--capacities", "32,64",
                 "--max-tokens", "32", "--html", str(out)]) == 0
    text = capsys.readouterr().out
    assert "lru" in text and "belady" in text and "hit rate" in text
    html = out.read_text()
    assert "plotly" in html.lower() and "belady" in html
    assert main(["trace", "cache-curve", str(TRACE), "--policies", "lru", "--capacities", "64",
                 "--max-tokens", "32", "--json", "--scope", "per_layer"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["scope"] == "per_layer" and d["results"][0]["capacity"] == 64
    assert d["results"][0]["hits"] + d["results"][0]["misses"] == 32 * 32 * 2


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--policies", "lru,nope"], "unknown cache policy 'nope'"),
        (["--capacities", "16,x"], "expected comma-separated positive integers"),
        (["--capacities", "0"], "positive integer capacities"),
        (["--capacities", "1"], "smaller than top_k"),
        (["--scope", "sideways"], "global or per_layer"),
        (["--batch-size", "0"], "positive batch size"),
        (["--capacities", "40", "--scope", "per_layer"], "per layer"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(args, msg, capsys):
    assert main(["trace", "cache-curve", str(TRACE), "--max-tokens", "8", *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_missing_trace_is_an_input_error(tmp_path, capsys):
    assert main(["trace", "cache-curve", str(tmp_path / "none.npz")]) == 2
    with pytest.raises(InputError):
        hit_curve(tmp_path / "none.npz", ["lru"], [16])
