"""Curves: hit rate and TPOT versus cache capacity for several cache policies, and TPOT versus link
bandwidth; hit rates by a replay without the timing engine, TPOT by capped runs; all cached."""

from __future__ import annotations

import copy

import plotly.graph_objects as go
import streamlit as st

from dashboard import common as C
from dashboard import ui
from moesim.errors import InputError

DEFAULT_KINDS = ["lru", "lfu", "belady"]


def default_capacities(total: int, top_k: int) -> list[int]:
    fr = (0.125, 0.25, 0.375, 0.5, 0.75)
    caps = sorted({max(top_k, int(round(total * f))) for f in fr})
    return caps


@st.cache_data(max_entries=32, show_spinner=False)
def hit_sweep(key: str, kinds: tuple, caps: tuple, _sc) -> dict:
    from moesim.engine.build import load_routing
    from moesim.policies.cache.curve import hit_curve

    trace, _ = load_routing(_sc, "curves")
    wl = _sc.workload
    scope = getattr(_sc.policies.cache, "scope", "global")
    return hit_curve(trace, list(kinds), list(caps), scope=scope, batch_size=wl.batch_size,
                     max_tokens=wl.max_tokens, warmup_tokens=wl.warmup_tokens, loop_trace=wl.loop_trace,
                     model=_sc.model, source="curves")


def _variant(raw: dict, kind: str | None = None, cap: int | None = None, bw: float | None = None) -> dict:
    r = copy.deepcopy(raw)
    if kind is not None:
        pol = r.setdefault("policies", {})
        old = pol.get("cache") if isinstance(pol.get("cache"), dict) else {}
        pol["cache"] = {"kind": kind, "capacity_experts": int(cap), "scope": old.get("scope", "global")}
    if bw is not None:
        hw = r.get("hardware")
        hw = {"preset": hw} if isinstance(hw, str) else dict(hw or {})
        link = dict(hw.get("link") or {})
        link["h2d_bandwidth_gb_s"] = float(bw)
        hw["link"] = link
        r["hardware"] = hw
    return r


def tpot_sweep(points: tuple, _raw: dict, _progress=None) -> list[dict]:
    """TPOT of each (kind, capacity, bandwidth) point; ``key`` is the base scenario hash."""
    rows = []
    for i, (kind, cap, bw) in enumerate(points):
        sc = C.validate_raw(_variant(_raw, kind, cap, bw), "curves")
        s = C.simulate_slim(sc)["summary"]
        rows.append({"policy": kind, "capacity": cap, "bandwidth": bw, "tpot_ms": s["tpot_ms"]["mean"],
                     "hit_rate": s["cache"]["hit_rate"]})
        if _progress is not None:
            _progress(i + 1, len(points))
    return rows


def _lines(rows: list[dict], x: str, y: str, title: str, xt: str, yt: str, scale: float = 1.0) -> go.Figure:
    fig = go.Figure()
    by: dict = {}
    for r in rows:
        by.setdefault(r["policy"], []).append(r)
    for kind, rs in by.items():
        rs = sorted(rs, key=lambda r: r[x])
        fig.add_trace(go.Scatter(x=[r[x] for r in rs], y=[None if r[y] is None else scale * r[y] for r in rs],
                                 mode="lines+markers", name=kind))
    fig.update_layout(title=title, xaxis_title=xt, yaxis_title=yt, height=360, margin=dict(l=10, r=10, t=40, b=10))
    return fig


def _run_points(raw, key, points, label):
    bar = st.progress(0.0, text=label)

    def prog(done, total):
        bar.progress(done / max(total, 1), text=f"{label}: {done}/{total} runs")

    try:
        return ui.cached(key, f"tpot_sweep:{points!r}", lambda: tpot_sweep(tuple(points), raw, prog))
    finally:
        bar.empty()


def render() -> None:
    from moesim.policies.base import registry

    st.header("Curves")
    raw, label = ui.working_raw()
    st.caption(f"Scenario: {label} (edit it on the What-if page); its token cap applies to every point.")
    try:
        sc = ui.validated(raw, label)
        key = C.scenario_key(sc)
    except InputError as exc:
        ui.show_error(exc)
        return
    if C.scenario_class(raw) == "throughput":
        st.info(f"{label} runs the throughput engine ({sc.policies.execution.kind}), which streams the weights "
                "itself and has no expert cache to sweep: its throughput block is on the What-if and Compare "
                "pages. Choose an expert-cache scenario on the What-if page for these curves.")
        return
    m = sc.model
    total = m.num_experts * len(m.moe_layers)
    kinds_all = [k for k in sorted(registry("cache")) if C.has_capacity(k)]
    c1, c2 = st.columns(2)
    with c1:
        kinds = st.multiselect("cache policies", kinds_all, default=[k for k in DEFAULT_KINDS if k in kinds_all],
                               key="cv_kinds")
    with c2:
        caps_text = st.text_input(f"capacities (expert slots, of {total})",
                                  ", ".join(str(c) for c in default_capacities(total, m.top_k)), key="cv_caps")
    with_tpot = st.checkbox("TPOT too (one capped run per point)", value=True, key="cv_tpot")
    try:
        caps = sorted({int(x) for x in caps_text.replace(" ", "").split(",") if x})
        if not caps or min(caps) < 1:
            raise ValueError
    except ValueError:
        st.error("capacities: expected comma-separated positive integers")
        return
    if not kinds:
        st.info("choose at least one cache policy")
        return
    try:
        hc = hit_sweep(key, tuple(kinds), tuple(caps), sc)
        st.plotly_chart(_lines(hc["results"], "capacity", "hit_rate", "hit rate vs cache capacity",
                               "capacity (expert slots)", "hit rate (%)", 100.0), width="stretch",
                        key="cv_hit")
        if with_tpot:
            rows = _run_points(raw, key, [(k, c, None) for k in kinds for c in caps], "TPOT vs capacity")
            st.plotly_chart(_lines(rows, "capacity", "tpot_ms", "mean TPOT vs cache capacity",
                                   "capacity (expert slots)", "TPOT (ms)"), width="stretch", key="cv_tpot_cap")
        st.subheader("TPOT vs link bandwidth")
        bw0 = float(sc.hardware.link.h2d_bandwidth_gb_s)
        cap_now = getattr(sc.policies.cache, "capacity_experts", None) or caps[len(caps) // 2]
        bws_text = st.text_input("host->GPU bandwidths (GB/s)",
                                 ", ".join(f"{b:g}" for b in sorted({8.0, 16.0, 32.0, round(bw0, 2), 128.0})),
                                 key="cv_bws")
        try:
            bws = sorted({float(x) for x in bws_text.replace(" ", "").split(",") if x})
            if not bws or min(bws) <= 0:
                raise ValueError
        except ValueError:
            st.error("bandwidths: expected comma-separated positive numbers")
            return
        rows = _run_points(raw, key, [(k, int(cap_now), b) for k in kinds for b in bws], "TPOT vs bandwidth")
        st.plotly_chart(_lines(rows, "bandwidth", "tpot_ms", f"mean TPOT vs link bandwidth ({cap_now} slots)",
                               "host->GPU bandwidth (GB/s)", "TPOT (ms)"), width="stretch", key="cv_bw")
    except InputError as exc:
        ui.show_error(exc)
