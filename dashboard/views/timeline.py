"""Timeline: a Gantt chart of the GPU compute stream, copy engines, host thread and CPU for a window
of decode steps and layers, coloured by kind. Never ships more than ``MAX_BARS`` bars."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboard import ui
from moesim.errors import InputError

RESOURCES = ["gpu0.compute", "gpu0.h2d", "gpu0.d2h", "host0", "cpu0"]
MAX_BARS = 3000
COLOURS = {
    "dense": "#7f7f7f", "head": "#bcbd22", "expert_hit": "#2ca02c", "expert_loaded": "#ff7f0e",
    "expert_streamed": "#d62728", "copy": "#1f77b4", "prefetch": "#17becf", "cpu_expert": "#9467bd",
    "launch": "#c7c7c7", "router_readback": "#8c564b", "token_readback": "#e377c2",
}


def window(df: pd.DataFrame, steps: tuple[int, int], layers: tuple[int, int], resources: list[str],
           cap: int = MAX_BARS) -> tuple[pd.DataFrame, int]:
    """Rows of ``df`` inside the step and layer windows on ``resources``, at most ``cap`` (earliest
    first); returns (rows, number matching before the cap). Rows with no layer (-1) are kept."""
    m = (df["step"] >= steps[0]) & (df["step"] <= steps[1]) & df["resource"].isin(resources)
    m &= ((df["layer"] >= layers[0]) & (df["layer"] <= layers[1])) | (df["layer"] < 0)
    sel = df[m]
    n = len(sel)
    if n > cap:
        sel = sel.nsmallest(cap, "start_s")
    return sel, n


def gantt(sel: pd.DataFrame, resources: list[str]) -> go.Figure:
    fig = go.Figure()
    for kind, g in sel.groupby("kind", observed=True):
        if g.empty:
            continue
        dur = (g["end_s"] - g["start_s"]).to_numpy() * 1e3
        start = g["start_s"].to_numpy() * 1e3
        custom = np.stack([g["step"], g["layer"], g["expert"], g["bytes"] / 1e6, dur], axis=1)
        fig.add_trace(go.Bar(
            name=str(kind), y=g["resource"].astype(str), x=dur, base=start, orientation="h",
            marker_color=COLOURS.get(str(kind)), customdata=custom,
            hovertemplate=(f"<b>{kind}</b><br>start %{{base:.4f}} ms<br>duration %{{customdata[4]:.4f}} ms"
                           "<br>step %{customdata[0]:.0f}, layer %{customdata[1]:.0f}, expert %{customdata[2]:.0f}"
                           "<br>%{customdata[3]:.2f} MB<extra></extra>"),
        ))
    fig.update_layout(barmode="overlay", height=140 + 45 * len(resources), xaxis_title="simulated time (ms)",
                      yaxis=dict(categoryorder="array", categoryarray=list(reversed(resources))),
                      margin=dict(l=10, r=10, t=30, b=10), legend_title="kind")
    return fig


def render() -> None:
    st.header("Timeline")
    raw, label = ui.working_raw()
    st.caption(f"Scenario: {label} (edit it on the What-if page). At most {MAX_BARS} bars are drawn: "
               "narrow the window to see everything in it.")
    try:
        sc = ui.validated(raw, label)
        out = ui.run(sc, timeline=True, label="simulating with timeline")
    except InputError as exc:
        ui.show_error(exc)
        return
    df = out["timeline"]
    if df is None or df.empty:
        st.info("this run recorded no intervals")
        return
    n_steps = int(df["step"].max()) + 1
    n_layers = int(df["layer"].max()) + 1 if (df["layer"] >= 0).any() else 1
    c1, c2, c3 = st.columns(3)
    with c1:
        first = st.number_input("first decode step", 0, max(n_steps - 1, 0), value=min(out["warmup_steps"], n_steps - 1),
                                key="tl_first")
        count = st.number_input("steps shown", 1, max(n_steps, 1), value=min(2, n_steps), key="tl_count")
    with c2:
        layers = st.slider("layers", 0, max(n_layers - 1, 0), (0, max(n_layers - 1, 0)), key="tl_layers") \
            if n_layers > 1 else (0, 0)
    with c3:
        present = [r for r in RESOURCES if r in set(df["resource"].astype(str))] or RESOURCES
        others = sorted(set(df["resource"].astype(str)) - set(RESOURCES))
        res = st.multiselect("resources", RESOURCES + others, default=RESOURCES, key="tl_res")
    res = res or present
    sel, n = window(df, (int(first), int(first + count - 1)), tuple(layers), res)
    if n > len(sel):
        st.warning(f"{n} intervals in this window; showing the first {len(sel)}. Narrow the steps or layers.")
    st.plotly_chart(gantt(sel, res), width="stretch", key="tl_gantt")
    st.caption(f"{len(sel)} bars of {len(df)} intervals recorded in {n_steps} decode steps; "
               "kinds: " + ", ".join(sorted(set(df['kind'].astype(str)))))
