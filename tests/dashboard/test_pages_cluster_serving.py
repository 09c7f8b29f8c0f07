"""The Cluster and Serving pages and the throughput-engine views, under streamlit.testing.v1.AppTest:
the figures and numbers on a page are those of the capped run's summary.json / requests table
(recomputed here by running the same capped scenario directly), controls move them the way the
model says they should, uploads are validated and confined. Plus exact checks of the helpers
(caps, scenario classes, request-table shapes, requests in the system over time)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from dashboard import common as C  # noqa: E402
from dashboard.views import cluster as CL  # noqa: E402
from dashboard.views import serving as SV  # noqa: E402
from moesim.errors import InputError  # noqa: E402

from tests.dashboard.apptest_helpers import APP  # noqa: E402
from tests.dashboard.apptest_helpers import arr as _arr  # noqa: E402
from tests.dashboard.apptest_helpers import metrics as _metrics  # noqa: E402
from tests.dashboard.apptest_helpers import ok as _ok  # noqa: E402

TIMEOUT = 240



def _page(page: str, **state) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    for k, v in state.items():
        at.session_state[k] = v
    at.session_state["page"] = page
    at.run()
    _ok(at)
    return at




def _z(a) -> np.ndarray:
    if isinstance(a, dict) and "bdata" in a:
        import base64

        flat = np.frombuffer(base64.b64decode(a["bdata"]), dtype=np.dtype(a["dtype"]))
        return flat.reshape(a["shape"] if isinstance(a["shape"], (list, tuple)) else
                            [int(x) for x in str(a["shape"]).split(",")])
    return np.asarray([_arr(r) for r in a], dtype=float)


def _fig_by_title(at: AppTest, text: str) -> dict:
    for c in at.get("plotly_chart"):
        f = json.loads(c.proto.spec)
        title = (f["layout"].get("title") or {}).get("text", "")
        subs = " ".join(a.get("text", "") for a in f["layout"].get("annotations", []))
        if text in title or text in subs:
            return f
    raise AssertionError(f"no figure titled {text!r}")


def _fmt(v) -> str:
    return f"{v:.4g}"


# ----- Cluster -------------------------------------------------------------------------------------


def _cluster_run(name: str, steps: int = C.DEFAULT_CLUSTER_STEPS, edit=None) -> dict:
    raw = C.load_bundled(name)
    if edit:
        edit(raw)
    capped = C.with_step_cap(raw, C.validate_raw(raw), steps)
    return C.simulate_slim(C.validate_raw(capped))["summary"]


def test_cluster_page_shows_the_capped_runs_summary():
    at = _page("Cluster")
    s = _cluster_run(CL.DEFAULT)
    ep = s["expert_parallel"]
    # measured steps = the cap; warm-up = the preset's 512 warm-up rows over one step's 8 ranks x 64
    assert (s["decode_steps"], s["warmup_steps"]) == (C.DEFAULT_CLUSTER_STEPS, 512 // (8 * 64))
    m = _metrics(at)
    for name, v in C.cluster_figures(s).items():
        assert m[name][0] == _fmt(v), name
        assert m[name][1] in ("", None)  # nothing edited: no deltas
    load = _fig_by_title(at, "expert tokens per GPU")
    assert _arr(load["data"][0]["y"]) == pytest.approx(ep["per_gpu"]["expert_tokens"])
    assert _arr(load["data"][1]["y"]) == pytest.approx(np.asarray(ep["per_gpu"]["busy_s"]) * 1e3)
    tot = np.asarray(ep["per_gpu"]["expert_tokens"], dtype=float)
    assert (f"max/mean per layer {ep['imbalance']['expert_tokens_max_over_mean']:.3g}, of the totals "
            f"{tot.max() / tot.mean():.3g}") in json.dumps(load["layout"])
    assert _arr(load["data"][2]["y"]) == ep["per_gpu"]["straggler_count"]
    heat = _fig_by_title(at, "GPU-to-GPU traffic")
    z = _z(heat["data"][0]["z"])
    assert z.shape == (8, 8) and np.allclose(z, np.asarray(ep["traffic"]["gpu_matrix_bytes"]) / 1e9)
    assert np.allclose(np.diag(z), 0) and z.sum() * 1e9 == pytest.approx(ep["traffic"]["total_bytes"], rel=1e-9)
    links = _fig_by_title(at, "link utilisation")
    shown = {n: u for t in links["data"] for n, u in zip(_arr(t["y"]), _arr(t["x"]))}
    assert shown and all(u == pytest.approx(100 * ep["links"][n]["utilization"]) for n, u in shown.items())
    stage = _fig_by_title(at, "stage time")
    bars = {t["name"]: _arr(t["x"])[0] for t in stage["data"] if t["type"] == "bar"}
    assert bars == pytest.approx(ep["stage_ms"])
    marker = next(t for t in stage["data"] if t["name"] == "measured time")
    assert _arr(marker["x"])[0] == pytest.approx(1e3 * s["measured_time_s"])


def test_cluster_controls_move_the_figures():
    at = _page("Cluster")
    m0 = _metrics(at)
    # two micro-batches: DeepSeek-V3's overlap hides all-to-all behind compute
    at.number_input(key="cl_e_mb").set_value(2).run()
    _ok(at)
    m1 = _metrics(at)
    assert float(m1["all-to-all hidden (ms)"][0]) > 0 == float(m0["all-to-all hidden (ms)"][0])
    assert m1["all-to-all hidden (ms)"][1].startswith("+")
    stage = _fig_by_title(at, "stage time")
    assert _arr(stage["data"][0]["y"]) == ["starting", "edited"]
    s_mb = _cluster_run(CL.DEFAULT, edit=lambda r: r.setdefault("parallel", {}).update(micro_batches=2))
    assert m1["TPOT mean (ms)"][0] == _fmt(s_mb["tpot_ms"]["mean"])
    # EPLB with a redundant replica per GPU: a second 8x22B expert per layer does not fit in 80 GB
    at.number_input(key="cl_e_mb").set_value(1).run()
    at.selectbox(key="cl_e_placement").set_value("eplb").run()
    at.number_input(key="cl_e_placement_eplb_redundant_experts").set_value(8).run()
    assert not at.exception and len(at.error) == 1 and "does not fit in GPU memory" in at.error[0].value
    # Qwen3-30B-A3B on 16 GPUs (8 experts per GPU and layer): round-robin spreads the same work differently
    at.selectbox(key="cl_base").set_value("qwen3-30b-a3b-2x8h100-folded").run()
    _ok(at)
    assert at.selectbox(key="cl_e_placement").value == "contiguous"  # edits reset with the scenario
    load0 = _arr(_fig_by_title(at, "expert tokens per GPU")["data"][0]["y"])
    at.selectbox(key="cl_e_placement").set_value("round_robin").run()
    _ok(at)
    load1 = _arr(_fig_by_title(at, "expert tokens per GPU")["data"][0]["y"])
    assert len(load1) == 16 and sum(load1) == pytest.approx(sum(load0)) and load1 != load0
    # hierarchical all-to-all and a larger batch per rank
    at.selectbox(key="cl_e_alltoall").set_value("hierarchical").run()
    _ok(at)
    at.number_input(key="cl_e_bs").set_value(128).run()
    _ok(at)
    raw = C.load_bundled("qwen3-30b-a3b-2x8h100-folded")
    R16 = C.cluster_rows_per_step(C.validate_raw(raw))[0]  # attention ranks x 16 sequences
    assert f" {R16 * 8} tokens per step" in " ".join(c.value for c in at.caption)  # 128 sequences per rank
    # the step cap; the warm-up keeps its number of steps when the batch changes
    at.number_input(key="cl_e_steps").set_value(2).run()
    _ok(at)
    warm = raw["workload"]["warmup_tokens"] // R16
    assert f"2 decode steps ({warm} warm-up)" in " ".join(c.value for c in at.caption)


def test_cluster_lists_multi_gpu_decode_only_and_switches():
    names = C.bundled_of_class("cluster")
    assert CL.DEFAULT in names and "deepseek-v3-4x8h100-eplb" in names
    assert not set(names) & set(C.bundled_scenarios())
    assert not set(names) & set(C.bundled_of_class("cluster-serving"))
    at = _page("Cluster")
    at.selectbox(key="cl_base").set_value("qwen3-30b-a3b-2x8h100-folded").run()
    _ok(at)
    s = _cluster_run("qwen3-30b-a3b-2x8h100-folded")
    assert _metrics(at)["throughput (tok/s)"][0] == _fmt(s["throughput_tok_s"])
    assert _z(_fig_by_title(at, "GPU-to-GPU traffic")["data"][0]["z"]).shape == (16, 16)


def _upload_page(page: str, prefix: str, content: bytes, name: str):  # runs as an AppTest script
    import importlib

    import streamlit as st

    view = importlib.import_module(f"dashboard.views.{page}")

    class _Up:
        def __init__(self):
            self.name = name

        def getvalue(self):
            return content

    real = st.file_uploader
    st.file_uploader = lambda *a, **k: _Up() if k.get("key") == f"{prefix}_upload" else real(*a, **k)
    try:
        view.render()
    finally:
        st.file_uploader = real


def _upload(page: str, prefix: str, content: bytes) -> AppTest:
    at = AppTest.from_function(_upload_page, args=(page, prefix, content, "mine.yaml"), default_timeout=TIMEOUT)
    at.session_state[f"{prefix}_src"] = "uploaded YAML"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


@pytest.mark.parametrize("page, prefix, content, what", [
    ("cluster", "cl", (C.SCENARIOS_DIR / "mixtral-8x7b-h100-lru-c96.yaml").read_bytes(), "not a multi-GPU"),
    ("cluster", "cl", b"include: [../../etc/passwd]\n", "outside the bundled scenarios"),
    ("cluster", "cl", b"include: [presets/mixtral-8x22b-ep8.yaml]\nparallel: {micro_batches: 99}\n", "micro_batches"),
    ("serving", "sv", (C.SCENARIOS_DIR / "mixtral-8x7b-h100-lru-c96.yaml").read_bytes(), "not a serving"),
    ("serving", "sv", b"include: [presets/mixtral-8x7b-h100.yaml]\npolicies: {cache: {kind: all_resident}}\n"
                      b"workload: {requests: {arrival: {kind: trace, path: /etc/passwd}, num_requests: 4}}\n",
     "outside the bundled traces"),
    ("serving", "sv", b"include: [presets/mixtral-8x7b-h100.yaml]\npolicies: {cache: {kind: all_resident}}\n"
                      b"workload: {requests: {arrival: {kind: poisson, rate_per_s: -1}, num_requests: 4}}\n",
     "rate_per_s"),
])
def test_bad_uploads_are_one_line_errors(page, prefix, content, what):
    at = _upload(page, prefix, content)
    assert at.error and all("\n" not in e.value and "Traceback" not in e.value for e in at.error)
    assert any(what in e.value for e in at.error), [e.value for e in at.error]


def test_good_cluster_upload_runs():
    at = _upload("cluster", "cl", b"name: my-ep8\ninclude: [presets/mixtral-8x22b-ep8.yaml]\n"
                                  b"policies: {alltoall: {kind: speculative}}\n")
    _ok(at)
    assert "all-to-all speculative" in " ".join(c.value for c in at.caption)


# ----- Serving -------------------------------------------------------------------------------------


def _serving_run(name: str, n: int = C.DEFAULT_MAX_REQUESTS, edit=None):
    raw = C.load_bundled(name)
    if edit:
        edit(raw)
    sc = C.validate_raw(C.with_request_cap(raw, n))
    out = C.simulate_slim(sc)
    return out["summary"], C.request_frame(out["requests"], sc.workload.requests.warmup_requests), sc


def test_serving_page_shows_the_capped_runs_requests():
    at = _page("Serving")
    s, d, sc = _serving_run(SV.DEFAULT)
    assert s["requests"] == C.DEFAULT_MAX_REQUESTS == len(d)
    m = _metrics(at)
    for name, v in C.serving_figures(s).items():
        assert m[name][0] == ("n/a" if v is None else _fmt(v)), name
    for col, title in SV.CDFS:
        f = _fig_by_title(at, title)
        assert len(f["data"]) == 1
        x, y = _arr(f["data"][0]["x"]), _arr(f["data"][0]["y"])
        assert x == pytest.approx(np.sort(d.loc[d["measured"], col].dropna().to_numpy()))
        assert y[-1] == pytest.approx(1.0)
    ttft = _arr(_fig_by_title(at, SV.CDFS[0][1])["data"][0]["x"])
    assert np.percentile(ttft, 50) == pytest.approx(s["ttft_ms"]["p50"])  # the summary's own percentiles
    good = _fig_by_title(at, "SLOs met")
    shares = dict(zip(_arr(good["data"][0]["x"]), _arr(good["data"][0]["y"])))
    assert shares["both"] == pytest.approx(100 * s["serving"]["slo_attainment"])
    assert _arr(good["data"][1]["y"]) == pytest.approx([s["serving"]["goodput_req_s"], s["serving"]["throughput_req_s"]])
    time_f = _fig_by_title(at, "requests waiting and running")
    tok = next(t for t in time_f["data"] if t["name"] == "output tokens/s")
    width = tok["width"]
    assert sum(_arr(tok["y"])) * width == pytest.approx(d["output_tokens"].sum())  # every token once


def test_serving_controls_rate_slo_batching():
    at = _page("Serving")
    p50 = float(_metrics(at)["TTFT p50 (ms)"][0])
    at.number_input(key="sv_e_rate").set_value(40.0).run()  # ten times the load
    _ok(at)
    m = _metrics(at)
    assert float(m["TTFT p50 (ms)"][0]) > p50 and m["TTFT p50 (ms)"][1].startswith("+")
    assert len(_fig_by_title(at, SV.CDFS[0][1])["data"]) == 2  # starting and edited overlaid
    s, _, _ = _serving_run(SV.DEFAULT, edit=lambda r: r["workload"]["requests"]["arrival"].update(rate_per_s=40.0))
    assert m["TTFT p50 (ms)"][0] == _fmt(s["ttft_ms"]["p50"])
    # an SLO tighter than most TTFTs: goodput falls below throughput
    at.number_input(key="sv_e_rate").set_value(4.0).run()
    at.number_input(key="sv_e_ttft_ms").set_value(p50).run()
    _ok(at)
    m = _metrics(at)
    att = float(m["SLO attainment (%)"][0])
    assert 0 < att < 100
    g = _fig_by_title(at, "SLOs met")
    edited = [t for t in g["data"] if t["name"] == "edited"]
    assert _arr(edited[1]["y"])[0] < _arr(edited[1]["y"])[1]
    # batching policy: static batches wait for the whole batch
    at.number_input(key="sv_e_ttft_ms").set_value(1000.0).run()
    at.selectbox(key="sv_e_batching").set_value("static").run()
    _ok(at)
    assert float(_metrics(at)["TTFT p50 (ms)"][0]) > p50
    # the request cap
    at.number_input(key="sv_e_n").set_value(16).run()
    _ok(at)
    assert _metrics(at)["finished requests"][0] == "16"


def test_serving_page_cluster_scenario():
    at = _page("Serving", sv_base="qwen3-30b-a3b-2x8h100-serving-elastic-8to16")
    s, d, _ = _serving_run("qwen3-30b-a3b-2x8h100-serving-elastic-8to16")
    assert "cluster_serving" in s
    assert _metrics(at)["goodput (req/s)"][0] == _fmt(s["serving"]["goodput_req_s"])
    f = _fig_by_title(at, SV.CDFS[2][1])
    assert _arr(f["data"][0]["x"]) == pytest.approx(np.sort(d.loc[d["measured"], "e2e_ms"].to_numpy()))


def test_serving_lists():
    names = C.bundled_of_class("serving", "cluster-serving")
    assert SV.DEFAULT in names and "deepseek-v3-pd-disagg" in names and "deepseek-v3-4x8h100-serving-colocated" in names
    assert not set(names) & set(C.bundled_of_class("cluster", "throughput", "single"))


# ----- throughput engine on the existing pages -----------------------------------------------------


def test_compare_shows_throughput_blocks():
    at = _page("Compare", cmp_0="mixtral-8x7b-t4-moe-lightning", cmp_1="mixtral-8x7b-t4-klotski")
    tables = at.dataframe
    assert len(tables) == 2
    tp = tables[1].value
    raw = C.with_token_cap(C.load_bundled("mixtral-8x7b-t4-moe-lightning"), C.DEFAULT_MAX_TOKENS)
    s = C.simulate_slim(C.validate_raw(raw))["summary"]
    row = tp.iloc[0]
    assert row["system"] == "moe_lightning" and float(row["tokens/s"]) == pytest.approx(s["throughput_tok_s"])
    pol = s["throughput"]["policy"]
    assert f"micro_batches={pol['micro_batches']}" in row["chosen policy"]
    assert f"attention={pol['attention']}" in row["chosen policy"]
    assert tp.iloc[1]["system"] == "klotski"


def test_whatif_on_a_throughput_scenario_keeps_its_policies():
    at = _page("What-if", wi_base="mixtral-8x7b-t4-klotski")
    # a scenario without a prefetch block starts at prefetch none (not the first kind listed)
    assert at.selectbox(key="wi_e_prefetch").value == "none"
    assert all(d in ("", None) for _, d in _metrics(at).values())
    tp = at.dataframe[0].value
    assert list(tp.index) == ["starting", "edited"] and set(tp["system"]) == {"klotski"}
    at.sidebar.radio(key="page").set_value("Curves").run()
    _ok(at)
    assert at.info and "throughput engine" in at.info[0].value
    at.sidebar.radio(key="page").set_value("Timeline").run()
    _ok(at)


# ----- helpers, exactly ----------------------------------------------------------------------------


def test_scenario_classes():
    assert C.scenario_class({"cluster": {"preset": "dgx-h100"}}) == "cluster"
    assert C.scenario_class({"cluster": {}, "workload": {"requests": {"num_requests": 1}}}) == "cluster-serving"
    assert C.scenario_class({"workload": {"requests": {}}}) == "serving"
    assert C.scenario_class({"policies": {"execution": {"kind": "klotski"}}}) == "throughput"
    assert C.scenario_class({"policies": {"execution": {"kind": "fiddler"}}}) == "single"
    every = sorted(p.stem for p in C.SCENARIOS_DIR.glob("*.yaml"))
    parts = [C.bundled_of_class(c) for c in ("single", "serving", "throughput", "cluster", "cluster-serving")]
    assert sorted(sum(parts, [])) == every  # each bundled scenario in exactly one class
    assert sorted(C.bundled_scenarios()) == sorted(parts[0] + parts[1] + parts[2])


def test_step_cap_rows():
    raw = C.load_bundled("deepseek-v3-4x8h100-eplb")  # 32 ranks x 32 = 1024 rows a step, 1 warm-up step
    sc = C.validate_raw(raw)
    assert C.cluster_rows_per_step(sc) == (1024, 1024)
    assert C.with_step_cap(raw, sc, 3)["workload"]["max_tokens"] == 4 * 1024
    assert C.with_step_cap(raw, sc, 1000)["workload"]["max_tokens"] == sc.workload.max_tokens  # never raised
    raw = C.load_bundled("qwen3-30b-a3b-elastic-8to16")
    sc = C.validate_raw(raw)
    before, after = C.cluster_rows_per_step(sc)
    el = sc.parallel.elastic
    B = sc.workload.batch_size
    assert (before, after) == (el.start_gpus * B, (el.end_gpus or 16) * B)
    capped = C.validate_raw(C.with_step_cap(raw, sc, 1))
    out = C.simulate_slim(capped)["summary"]
    # at least two steps after the scale-up, whatever the cap
    assert out["decode_steps"] + out["warmup_steps"] == max(out["warmup_steps"] + 1, el.at_step + 2)


def test_request_cap():
    raw = {"workload": {"requests": {"num_requests": 96, "warmup_requests": 10}}}
    assert C.with_request_cap(raw, 8)["workload"]["requests"] == {"num_requests": 8, "warmup_requests": 2}
    assert C.with_request_cap(raw, 500)["workload"]["requests"]["num_requests"] == 96
    only_duration = {"workload": {"requests": {"duration_s": 60}}}
    assert C.with_request_cap(only_duration, 8)["workload"]["requests"] == {"duration_s": 60, "num_requests": 8}
    assert raw["workload"]["requests"]["num_requests"] == 96  # the input is not changed


def test_arrival_file_confined():
    ok = {"workload": {"requests": {"arrival": {"kind": "trace", "path": "../traces/x.csv"}}}}
    C.check_trace_allowed(ok, source="t")
    for bad in ("/etc/passwd", "../README.md", "../traces/../pyproject.toml"):
        with pytest.raises(InputError, match="outside the bundled traces"):
            C.check_trace_allowed({"workload": {"requests": {"arrival": {"kind": "trace", "path": bad}}}}, source="t")


def _frame(rows):
    cols = ["request", "arrival_s", "prefill_start_s", "first_token_s", "kv_ready_s", "decode_start_s", "finish_s",
            "prompt_tokens", "output_tokens", "decode_gpu"]
    return pd.DataFrame(rows, columns=cols)


def test_request_frame_of_a_pd_table_and_in_system():
    # the P/D engine writes times only: the derived columns follow its summary's definitions
    df = _frame([[0, 0.0, 0.5, 1.0, 1.1, 1.2, 3.0, 10, 5, 0],
                 [1, 0.2, 1.0, 1.5, 1.6, 1.7, 2.0, 10, 1, 1],
                 [2, 0.4, 2.0, 2.5, 2.6, 2.7, -1.0, 10, 4, 0]])  # not finished
    d = C.request_frame(df, warmup_requests=1)
    assert d["ttft_ms"].tolist()[:2] == pytest.approx([1000.0, 1300.0]) and np.isnan(d["ttft_ms"][2])
    assert d["e2e_ms"].tolist()[:2] == pytest.approx([3000.0, 1800.0])
    assert d["tpot_ms"][0] == pytest.approx(2000.0 / 4) and np.isnan(d["tpot_ms"][1])
    assert d["queue_ms"].tolist()[:2] == pytest.approx([500.0, 800.0])
    assert d["measured"].tolist() == [False, True, False]
    grid = [0.1, 0.3, 0.6, 1.2, 2.1, 5.0]
    waiting, running = C.in_system(d, grid)
    # brute force: waiting = arrived and not started; running = started and not finished (never, if -1)
    exp_w, exp_r = [], []
    for t in grid:
        exp_w.append(sum(a <= t < s for a, s in zip(d.arrival_s, d.start_s)))
        exp_r.append(sum(s <= t and (f < 0 or t < f) for s, f in zip(d.start_s, d.finish_s)))
    assert waiting.tolist() == exp_w and running.tolist() == exp_r


def test_in_system_time_average_is_littles_law():
    s, d, _ = _serving_run(SV.DEFAULT, n=24)
    grid = np.linspace(0, s["measured_time_s"], 20001)[:-1]
    w, r = C.in_system(d, grid)
    assert np.mean(w + r) == pytest.approx(s["serving"]["mean_in_system"], rel=0.01)
    o = SV.over_time(d, bins=30)
    width = o["edges"][1] - o["edges"][0]
    assert (o["completions"] * width).sum() == pytest.approx((d["finish_s"] >= 0).sum())
    assert (o["arrivals"] * width).sum() == pytest.approx(len(d))



@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10), st.floats(0, 5), st.floats(0, 5), st.floats(0, 5), st.booleans(),
                          st.integers(1, 40)), min_size=1, max_size=25),
       st.lists(st.floats(0, 30), min_size=1, max_size=20))
def test_in_system_and_token_spread_properties(reqs, grid):
    """Against brute force on random request tables: the waiting/running counts at any time, and
    the per-bin output tokens adding up to every finished request's tokens."""
    rows = []
    for i, (arr, wait, ttft, dur, done, n) in enumerate(reqs):
        start, first = arr + wait, arr + wait + ttft
        rows.append([i, arr, start, first, first, first, first + dur if done else -1.0, 8, n, 0])
    d = C.request_frame(_frame(rows))
    w, r = C.in_system(d, grid)
    for j, t in enumerate(grid):
        assert w[j] == sum(a <= t < b for a, b in zip(d.arrival_s, d.start_s))
        assert r[j] == sum(b <= t and (f < 0 or t < f) for b, f in zip(d.start_s, d.finish_s))
    o = SV.over_time(d, bins=7)
    width = o["edges"][1] - o["edges"][0]
    fin = d["finish_s"] >= 0
    assert (o["tokens"] * width).sum() == pytest.approx(d.loc[fin, "output_tokens"].sum())
    assert (o["arrivals"] * width).sum() == pytest.approx(len(d))
