"""Trace explorer: popularity heatmap (layer x expert), temporal reuse, the trace toolkit's statistics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboard import common as C
from dashboard import ui
from moesim.errors import InputError

SCENARIO_TRACE = "(the What-if scenario's trace)"


@st.cache_data(max_entries=16, show_spinner=False)
def trace_stats(sha: str, _trace) -> dict:
    from moesim.traces import basic_stats

    return basic_stats(_trace)


def _load(choice: str):
    from moesim.engine.build import load_routing
    from moesim.traces import load_trace

    if choice == SCENARIO_TRACE:
        raw, label = ui.working_raw()
        sc = ui.validated(raw, label)
        trace, sha = load_routing(sc, label)
        return trace, sha or C.scenario_key(sc)
    if choice.startswith("uploaded: "):
        path = st.session_state["uploaded_trace_path"]
    else:
        path = str(C.TRACES_DIR / choice)
    tr = load_trace(path)
    return tr, tr.sha256 or C.trace_sha(path)


def render() -> None:
    st.header("Trace explorer")
    options = C.bundled_traces() + [SCENARIO_TRACE]
    if st.session_state.get("uploaded_trace_path"):
        options.append("uploaded: " + st.session_state.get("uploaded_trace_name", "trace.npz"))
    choice = st.selectbox("trace", options, key="tr_choice")
    try:
        trace, sha = _load(choice)
        stats = trace_stats(sha, trace)
    except InputError as exc:
        ui.show_error(exc)
        return
    pop = np.asarray(stats["popularity"], dtype=float)
    tot = pop.sum(axis=1, keepdims=True)
    share = np.divide(pop, tot, out=np.zeros_like(pop), where=tot > 0)
    layers = stats["layers"] or list(range(stats["num_layers"]))
    norm = st.radio("heatmap", ["share of the layer's choices", "counts"], horizontal=True, key="tr_norm")
    z = 100 * share if norm.startswith("share") else pop
    fig = go.Figure(go.Heatmap(z=z, x=list(range(pop.shape[1])), y=[str(x) for x in layers], colorscale="Viridis",
                               colorbar_title="%" if norm.startswith("share") else "count",
                               hovertemplate="layer %{y}, expert %{x}: %{z:.3g}<extra></extra>"))
    fig.update_layout(title="expert popularity (layer x expert)", xaxis_title="expert", yaxis_title="layer",
                      height=max(300, 14 * len(layers) + 120), margin=dict(l=10, r=10, t=40, b=10))
    st.plotly_chart(fig, width="stretch", key="tr_heat")
    c1, c2 = st.columns(2)
    with c1:
        f2 = go.Figure(go.Bar(x=[str(x) for x in layers],
                              y=[None if r is None else 100 * r for r in stats["reuse_rate"]]))
        f2.update_layout(title="temporal reuse: rows sharing an expert with the previous row (%)",
                         xaxis_title="layer", yaxis_title="%", height=320, margin=dict(l=10, r=10, t=40, b=10))
        st.plotly_chart(f2, width="stretch", key="tr_reuse")
    with c2:
        f3 = go.Figure(go.Bar(x=[str(x) for x in layers], y=[100 * s for s in stats["top_expert_share"]]))
        f3.update_layout(title="most chosen expert's share of the layer (%)", xaxis_title="layer", yaxis_title="%",
                         height=320, margin=dict(l=10, r=10, t=40, b=10))
        st.plotly_chart(f3, width="stretch", key="tr_top")
    scal = {k: v for k, v in stats.items() if not isinstance(v, (list, dict))}
    scal["distinct experts (min/max per layer)"] = f"{min(stats['distinct_experts'])}/{max(stats['distinct_experts'])}"
    st.subheader("statistics (moesim.traces.basic_stats)")
    st.dataframe(pd.DataFrame({"value": [str(v) for v in scal.values()]}, index=list(scal)),
                 width="stretch")
