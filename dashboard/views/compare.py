"""Compare: two to four configurations side by side (table, bar charts, latency CDFs overlaid)."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboard import common as C
from dashboard import ui
from moesim.errors import InputError
from moesim.metrics.cdf import latency_cdf

CURRENT = "(the What-if scenario)"
DEFAULTS = ["mixtral-8x7b-h100-lru-c96", "mixtral-8x7b-h100-fiddler-c96", "mixtral-8x7b-h100-hybrimoe-c96",
            "mixtral-8x7b-h100-streaming"]


def render() -> None:
    st.header("Compare")
    names = C.bundled_scenarios()
    options = [CURRENT] + names
    n = st.slider("configurations", 2, 4, 2, key="cmp_n")
    cap = st.number_input("max tokens (cap for every configuration)", C.MIN_MAX_TOKENS, C.HARD_MAX_TOKENS,
                          C.DEFAULT_MAX_TOKENS, step=64, key="cmp_cap")
    cols = st.columns(n)
    chosen = []
    fallback = [d for d in DEFAULTS if d in names] + names
    for i in range(n):
        default = fallback[i] if i < len(fallback) else CURRENT
        with cols[i]:
            chosen.append(st.selectbox(f"configuration {i + 1}", options, index=options.index(default),
                                       key=f"cmp_{i}"))
    results = []
    try:
        for i, name in enumerate(chosen):
            if name == CURRENT:
                raw, label = ui.working_raw()
            else:
                raw, label = C.load_bundled(name), name
            raw = C.with_token_cap(raw, int(cap))
            out = ui.run(ui.validated(raw, label), label=f"configuration {i + 1}")
            results.append((f"{i + 1}: {label}", out))
    except InputError as exc:
        ui.show_error(exc)
        return
    table = pd.DataFrame({lab: C.key_figures(o["summary"]) for lab, o in results}).T
    st.dataframe(table.style.format("{:.4g}", na_rep="n/a"), width="stretch")
    tp_rows = {lab: C.throughput_figures(o["summary"]) for lab, o in results}
    if any(tp_rows.values()):
        st.markdown("**Throughput engine** (MoE-Lightning, Klotski, MoE-Gen: the runs' `throughput` blocks)")
        st.dataframe(C.throughput_table(tp_rows), width="stretch", key="cmp_tp")
    figs = [("TPOT mean (ms)", "TPOT p99 (ms)"), ("throughput (tok/s)",), ("hit rate (%)",), ("GB host->GPU",)]
    bcols = st.columns(len(figs))
    for j, metrics in enumerate(figs):
        fig = go.Figure()
        for mname in metrics:
            fig.add_trace(go.Bar(name=mname, x=["#" + lab.split(":")[0] for lab, _ in results],
                                 y=[C.key_figures(o["summary"])[mname] for _, o in results]))
        fig.update_layout(title=" / ".join(metrics), height=300, margin=dict(l=10, r=10, t=40, b=10),
                          showlegend=len(metrics) > 1, xaxis_title="configuration")
        with bcols[j]:
            st.plotly_chart(fig, width="stretch", key=f"cmp_bar_{j}")
    fig = go.Figure()
    for lab, o in results:
        x, y = latency_cdf(o["lat_ms"])
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=lab, line_shape="hv"))
    fig.update_layout(title="per-step latency CDF (measured steps)", xaxis_title="step latency (ms)",
                      yaxis_title="fraction of steps", height=380, margin=dict(l=10, r=10, t=40, b=10))
    st.plotly_chart(fig, width="stretch", key="cmp_cdf")
