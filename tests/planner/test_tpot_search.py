"""``moesim search-tpot``: the bisection finds the exhaustive sweep's best on a small space, the
exhaustive best is the brute-force optimum of independent runs, the frontier is the Pareto set,
and bad input is one line with exit code 2."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from moesim.cli import app, main
from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from moesim.planner.tpot import search_tpot

BATCHES = [1, 2, 4, 8, 16, 32, 64]
SPLITS = [None, 2, 4]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = {
        "name": "tpot-search-test",
        "model": {"preset": "mixtral-8x7b"},
        "hardware": {"preset": "h100-sxm-pcie5"},
        "cluster": {"preset": "dgx-h100", "nodes": 2, "gpus_per_node": 4, "nic": {"nics_per_node": 4}},
        "parallel": {"micro_batches": 2, "gpu_cost_per_hour": 2.0, "attention_gpu_cost_per_hour": 1.5},
        "trace": {"synthetic": {"tokens": 1024, "zipf_s": 0.8, "reuse_prob": 0.2, "seed": 3}},
        "workload": {"batch_size": 8, "context_tokens": 512,
                     "requests": {"arrival": {"kind": "poisson", "rate_per_s": 5}, "num_requests": 4}},
        "runtime": {"launch_mode": "graph", "wait_for_router": False},
        "policies": {"cache": {"kind": "all_resident"}, "placement": {"kind": "contiguous"},
                     "alltoall": {"kind": "direct"}},
    }
    p = tmp_path_factory.mktemp("tpot") / "base.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


@pytest.fixture(scope="module")
def exhaustive(base):
    return {lim: search_tpot(base, tpot_ms=lim, batches=BATCHES, attention_gpus=SPLITS, method="exhaustive", steps=2)
            for lim in (12.0, 16.5)}


def test_exhaustive_best_is_the_brute_force_optimum(base, exhaustive):
    lim = 16.5
    res = exhaustive[lim]
    assert res.settings["runs"] == len(BATCHES) * len(SPLITS)
    best = None
    for a in SPLITS:  # independent runs of the same points
        for b in BATCHES:
            mb = min(2, b)
            sets = ["workload.requests=null", "policies.batching=null", f"workload.batch_size={b}",
                    f"parallel.attention_gpus={'null' if a is None else a}", f"parallel.micro_batches={mb}",
                    f"workload.max_tokens={(a or 8) * b * 2}", "workload.loop_trace=true"]
            s = simulate(load_scenario(base, sets)).summary
            tpot = s["tpot_ms"]["mean"]
            obj = s["expert_parallel"]["efficiency"]["tokens_per_s_per_gpu"]
            if tpot <= lim and (best is None or obj > best[0]):
                best = (obj, a, b)
    assert best is not None
    assert (res.best.objective, res.best.attention_gpus, res.best.batch) == pytest.approx(best)


@pytest.mark.parametrize("lim", [12.0, 16.5])
def test_bisection_finds_the_exhaustive_best(base, exhaustive, lim):
    ex = exhaustive[lim]
    # the bisection's assumptions hold on this space: the feasible batches of a split are a prefix
    # of the batch list and throughput per GPU grows over it
    for a in SPLITS:
        pts = [p for p in ex.points if p.attention_gpus == a]
        ok = [p.feasible for p in pts]
        assert ok == sorted(ok, reverse=True)
        feas = [p.objective for p in pts if p.feasible]
        assert feas == sorted(feas)
    assert len({p.attention_gpus for p in ex.points if p.feasible}) >= 2  # more than one split in play
    bi = search_tpot(base, tpot_ms=lim, batches=BATCHES, attention_gpus=SPLITS, method="bisect", steps=2)
    assert (bi.best.attention_gpus, bi.best.batch) == (ex.best.attention_gpus, ex.best.batch)
    assert bi.best.objective == ex.best.objective
    assert bi.settings["runs"] < ex.settings["runs"]
    assert all(p.feasible == (p.tpot_ms is not None and p.tpot_ms <= lim) for p in bi.points)


def test_frontier_is_the_pareto_set(exhaustive):
    res = exhaustive[16.5]
    fit = [p for p in res.points if p.fits]
    front = res.frontier

    def dominates(q, p):
        return q.tpot_ms <= p.tpot_ms and q.objective >= p.objective and (q.tpot_ms < p.tpot_ms or q.objective > p.objective)

    assert front and all(not any(dominates(q, p) for q in fit) for p in front)
    assert all(any(dominates(q, p) for q in front) for p in fit if p not in front)


def test_per_dollar_objective_prices_the_two_pools(base):
    res = search_tpot(base, tpot_ms=100.0, batches=[8], attention_gpus=[None, 4], objective="per_dollar",
                      method="exhaustive", steps=2)
    co, afd = res.points
    # tokens per dollar = tokens/s / (dollars/s); co-located: 8 GPUs at 2.0, AFD: 4 at 1.5 + 4 at 2.0
    assert co.objective == pytest.approx(co.throughput_tok_s / (8 * 2.0 / 3600))
    assert afd.objective == pytest.approx(afd.throughput_tok_s / ((4 * 2.0 + 4 * 1.5) / 3600))


def test_cli_search_and_bad_input(base, tmp_path, capsys):
    r = CliRunner().invoke(app, ["search-tpot", str(base), "--tpot-ms", "12", "--batches", "4,16,64",
                                 "--attention-gpus", "none,4", "--steps", "2", "-q", "--out", str(tmp_path / "s.json")])
    assert r.exit_code == 0, r.output
    assert "best" in r.output and "frontier" in r.output
    assert json.loads((tmp_path / "s.json").read_text())["best"] is not None
    for args, msg in ((["--tpot-ms", "5", "--stat", "p95"], "--stat"),
                      (["--tpot-ms", "5", "--attention-gpus", "eight"], "--attention-gpus"),
                      (["--tpot-ms", "5", "--attention-gpus", "8"], "leaves no GPU")):
        code = main(["search-tpot", str(base), *args])
        err = capsys.readouterr().err
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1
