"""Serving: one run of requests arriving over time (a scenario with ``workload.requests``), on one GPU
or on a cluster (co-located, attention-FFN or prefill/decode disaggregated): TTFT / TPOT / end-to-end
latency distributions from the run's per-request table, requests waiting and running over time,
throughput over time, and goodput under the SLOs. What-if controls: arrival rate, batching policy,
SLOs."""

from __future__ import annotations

import copy

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from dashboard import common as C
from dashboard import ui
from moesim.errors import InputError
from moesim.metrics.cdf import latency_cdf

DEFAULT = "mixtral-8x7b-h100-continuous"  # one H100, all experts resident: a capped run takes about 0.5 s
PREFIX = "sv_e_"
CDFS = (("ttft_ms", "time to first token (ms)"), ("tpot_ms", "time per output token, per request (ms)"),
        ("e2e_ms", "end-to-end latency (ms)"))
TIME_BINS = 60
RUN_COLOURS = ("#4c78a8", "#f58518")  # starting, edited


def _k(name: str) -> str:
    return PREFIX + name


def _reset_edits() -> None:
    for k in [k for k in st.session_state.keys() if str(k).startswith(PREFIX)]:
        del st.session_state[k]


def _requests_block(raw: dict) -> dict:
    wl = raw.setdefault("workload", {})
    req = wl.get("requests") if isinstance(wl, dict) else None
    if not isinstance(req, dict):
        raise InputError("expected a workload.requests block (a serving run)", source="serving",
                         field="workload.requests")
    return req


def build_edited(base_raw: dict) -> tuple[dict, int]:
    """The what-if widgets; returns the edited raw scenario (before the request cap) and the cap."""
    from moesim.policies.base import registry

    raw = copy.deepcopy(base_raw)
    req = _requests_block(raw)
    c1, c2, c3 = st.columns(3)
    with c1:
        st.markdown("**Arrivals**")
        arr = req.get("arrival") if isinstance(req.get("arrival"), dict) else {}
        req["arrival"] = arr
        if arr.get("kind") == "trace":
            ts0 = float(arr.get("time_scale", 1.0))
            ui.init(_k("scale"), ts0)
            ts = st.number_input("time scale of the arrival file (0.5 = twice as fast)", 0.01, 100.0,
                                 key=_k("scale"), format="%.3g")
            if abs(ts - ts0) > 1e-12:
                arr["time_scale"] = float(ts)
        else:
            r0 = float(arr.get("rate_per_s", 1.0))
            ui.init(_k("rate"), r0)
            rate = st.number_input(f"arrival rate (requests/s, {arr.get('kind', 'poisson')})", 0.001, 1e5,
                                   key=_k("rate"), format="%.4g")
            if abs(rate - r0) > 1e-12:
                arr["rate_per_s"] = float(rate)
        ui.init(_k("n"), C.DEFAULT_MAX_REQUESTS)
        n = st.number_input(f"requests (cap, at most {C.HARD_MAX_REQUESTS})", 1, C.HARD_MAX_REQUESTS, step=8,
                            key=_k("n"), help="every run here, the starting scenario's included, stops after "
                                              "this many requests; keeps answers fast")
    pol = raw.get("policies") if isinstance(raw.get("policies"), dict) else {}
    raw["policies"] = pol
    with c2:
        st.markdown("**Batching**")
    block = pol.get("batching") if isinstance(pol.get("batching"), dict) else {}
    if "kind" not in block:
        block = {**block, "kind": "continuous"}
    pol["batching"] = ui.policy_editor("batching", sorted(registry("batching")), block, c2, _k)
    with c3:
        st.markdown("**Service-level objectives**")
        slo = req.get("slo") if isinstance(req.get("slo"), dict) else {}
        req["slo"] = slo
        for name, label, default in (("ttft_ms", "TTFT SLO (ms)", 1000.0), ("tpot_ms", "TPOT SLO (ms)", 100.0)):
            v0 = float(slo.get(name, default))
            ui.init(_k(name), v0)
            v = st.number_input(label, 0.001, 1e7, key=_k(name), format="%.4g")
            if abs(v - v0) > 1e-12:
                slo[name] = float(v)
    return raw, int(n)


def cdf_fig(runs: list[tuple[str, object]], col: str, title: str) -> go.Figure:
    """Empirical CDF of column ``col`` over the measured requests of each run."""
    fig = go.Figure()
    for lab, d in runs:
        x, y = latency_cdf(d.loc[d["measured"], col].dropna().to_numpy())
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=lab, line_shape="hv"))
    fig.update_layout(title=title, xaxis_title="ms", yaxis_title="fraction of requests", height=320,
                      margin=dict(l=10, r=10, t=40, b=10), legend=dict(orientation="h", y=-0.25))
    return fig


def over_time(d, bins: int = TIME_BINS) -> dict:
    """Per time bin of the run: bin edges (s), requests waiting and running at each bin's start,
    arrivals/s, completions/s and output tokens/s (each finished request's tokens spread evenly from
    its first token to its last, the first at its own time; a request unfinished at the end of the
    run is left out)."""
    end = float(np.nanmax(np.r_[d["finish_s"].to_numpy(), d["arrival_s"].to_numpy()]))
    edges = np.linspace(0.0, max(end, 1e-9), bins + 1)
    width = edges[1] - edges[0]
    waiting, running = C.in_system(d, edges[:-1])
    arrivals = np.histogram(d["arrival_s"], bins=edges)[0] / width
    fin = d.loc[d["finish_s"] >= 0]
    completions = np.histogram(fin["finish_s"], bins=edges)[0] / width
    tok = np.histogram(fin["first_token_s"], bins=edges)[0].astype(float)
    for a, b, n in zip(fin["first_token_s"], fin["finish_s"], fin["output_tokens"]):
        if n > 1:  # tokens 2..n at even spacing in (a, b]
            times = a + (b - a) * np.arange(1, n) / (n - 1)
            tok += np.histogram(times, bins=edges)[0]
    return {"edges": edges, "waiting": waiting, "running": running, "arrivals": arrivals,
            "completions": completions, "tokens": tok / width}


def time_fig(d) -> go.Figure:
    """Requests in the system and throughput over the run's simulated time."""
    o = over_time(d)
    t = o["edges"][:-1]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1, specs=[[{}], [{"secondary_y": True}]],
                        subplot_titles=("requests waiting and running",
                                        "throughput (a request's tokens spread evenly from its first to its last)"))
    fig.add_trace(go.Scatter(x=t, y=o["waiting"], name="waiting (queued)", line_shape="hv"), row=1, col=1)
    fig.add_trace(go.Scatter(x=t, y=o["running"], name="running", line_shape="hv"), row=1, col=1)
    fig.add_trace(go.Bar(x=t, y=o["tokens"], name="output tokens/s", opacity=0.5, offset=0,
                         width=float(o["edges"][1] - o["edges"][0])), row=2, col=1)
    fig.add_trace(go.Scatter(x=t, y=o["arrivals"], name="arrivals/s", line_shape="hv"), row=2, col=1, secondary_y=True)
    fig.add_trace(go.Scatter(x=t, y=o["completions"], name="completions/s", line_shape="hv"), row=2, col=1,
                  secondary_y=True)
    fig.update_yaxes(title_text="requests", row=1, col=1)
    fig.update_yaxes(title_text="tokens/s", row=2, col=1)
    fig.update_yaxes(title_text="requests/s", row=2, col=1, secondary_y=True, rangemode="tozero")
    fig.update_xaxes(title_text="simulated time (s)", row=2, col=1)
    fig.update_layout(height=520, margin=dict(l=10, r=10, t=40, b=10))
    return fig


def slo_shares(d, slo) -> dict:
    """Shares of the measured requests meeting the TTFT SLO, the TPOT SLO and both (an unfinished
    request meets neither; a one-token request has no TPOT and meets that SLO)."""
    m = d.loc[d["measured"]]
    done = (m["finish_s"] >= 0).to_numpy()
    ttft = done & (m["ttft_ms"].to_numpy() <= slo.ttft_ms)
    tpot = done & ((m["output_tokens"].to_numpy() <= 1) | (m["tpot_ms"].to_numpy() <= slo.tpot_ms))
    n = max(len(m), 1)
    return {"TTFT": ttft.sum() / n, "TPOT": tpot.sum() / n, "both": (ttft & tpot).sum() / n}


def goodput_fig(runs: list[tuple[str, object, dict, object]]) -> go.Figure:
    """Per run ``(label, request frame, summary, slo)``: SLO attainment by objective, and goodput
    against throughput in requests/s (from the summary)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("SLOs met (%)", "requests/s"))
    for i, (lab, d, s, slo) in enumerate(runs):
        colour = RUN_COLOURS[i % len(RUN_COLOURS)]
        sh = slo_shares(d, slo)
        fig.add_trace(go.Bar(x=list(sh), y=[100 * v for v in sh.values()], name=lab, marker_color=colour),
                      row=1, col=1)
        sv = s.get("serving") or {}
        thr = sv.get("throughput_req_s")
        if thr is None:  # the P/D summary has no request throughput: finished requests over the run
            thr = sv.get("finished_requests", 0) / s["measured_time_s"] if s.get("measured_time_s") else None
        fig.add_trace(go.Bar(x=["goodput", "throughput"], y=[sv.get("goodput_req_s"), thr], name=lab,
                             marker_color=colour, showlegend=False), row=1, col=2)
    fig.update_layout(height=360, margin=dict(l=10, r=10, t=40, b=10), barmode="group",
                      legend=dict(orientation="h", y=-0.15))
    return fig


def render() -> None:
    st.header("Serving")
    st.caption("Requests arriving over time, on one GPU or a cluster. Runs are capped at the number of requests "
               "below, cached by scenario hash; a single-GPU run stops when you press Stop or change a control. "
               "A cluster run first measures its step costs with expert-parallel runs (several seconds) and "
               "finishes once started.")
    names = C.bundled_of_class("serving", "cluster-serving")
    base_raw, label = ui.pick_scenario(
        "sv", names, DEFAULT, accept=("serving", "cluster-serving"),
        what="a serving scenario (workload.requests)")
    if base_raw is None:
        return
    if st.session_state.get("sv_base_id") != label:
        st.session_state["sv_base_id"] = label
        _reset_edits()
    with st.expander("starting scenario", expanded=False):
        st.code(C.to_yaml(base_raw), language="yaml")
    try:
        edited, n = build_edited(base_raw)
        base_c, edit_c = C.with_request_cap(base_raw, n), C.with_request_cap(edited, n)
        sc_b = ui.validated(base_c, "starting scenario")
        sc_e = ui.validated(edit_c, "edited scenario")
        out = ui.run(sc_e, label="edited scenario", unit="finished requests")
        same = C.scenario_key(sc_b) == C.scenario_key(sc_e)
        out_b = out if same else ui.run(sc_b, label="starting scenario", unit="finished requests")
    except InputError as exc:
        ui.show_error(exc)
        return
    s, sb = out["summary"], out_b["summary"]
    req = sc_e.workload.requests
    d = C.request_frame(out["requests"], req.warmup_requests)
    db = d if same else C.request_frame(out_b["requests"], sc_b.workload.requests.warmup_requests)
    sv = s.get("serving") or {}
    st.subheader("Key figures")
    st.caption(f"{sv.get('mode', 'one GPU')}: {int(d['measured'].sum())} measured requests of {len(d)}, batching "
               f"{s.get('policies', {}).get('batching', '?')}, SLO TTFT {req.slo.ttft_ms:g} ms / TPOT "
               f"{req.slo.tpot_ms:g} ms. Hash {s['scenario_hash'][:8]}."
               + ("" if same else " Deltas against the starting scenario under the same cap."))
    ui.metric_row(C.serving_figures(s), None if same else C.serving_figures(sb), C.SERVING_LOWER_IS_BETTER)
    runs = [("this run", d)] if same else [("starting", db), ("edited", d)]
    cols = st.columns(len(CDFS))
    for i, (col, title) in enumerate(CDFS):
        with cols[i]:
            st.plotly_chart(cdf_fig(runs, col, title), width="stretch", key=f"sv_cdf_{col}")
    g = [("this run" if same else "edited", d, s, req.slo)]
    if not same:
        g.insert(0, ("starting", db, sb, sc_b.workload.requests.slo))
    c1, c2 = st.columns([3, 2])
    with c1:
        st.plotly_chart(time_fig(d), width="stretch", key="sv_time")
    with c2:
        st.plotly_chart(goodput_fig(g), width="stretch", key="sv_goodput")
    for note in out["notes"]:
        st.caption("note: " + note)
    st.download_button("Download edited scenario (YAML)", C.to_yaml(edit_c), file_name=f"{sc_e.name}-edited.yaml",
                       mime="application/x-yaml", key="sv_dl_yaml")
    st.download_button("Download requests (CSV)", out["requests"].to_csv(index=False), file_name="requests.csv",
                       mime="text/csv", key="sv_dl_csv")
