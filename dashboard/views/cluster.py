"""Cluster: one multi-GPU expert-parallel decode run (a scenario with a ``cluster:`` block): where
the expert load landed per GPU, who sent how much to whom, how busy each link was, and how a decode
step splits into attention, dispatch, experts and combine. What-if controls: placement, all-to-all,
micro-batches, batch size per rank."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from dashboard import common as C
from dashboard import ui
from moesim.errors import InputError

DEFAULT = "mixtral-8x22b-ep8-direct"  # one node, 8 GPUs: its capped run answers in well under a second
PREFIX = "cl_e_"  # edit widgets, reset when the starting scenario changes
STAGES = ("attention", "dispatch", "experts", "combine")
TOP_LINKS = 40


def _k(name: str) -> str:
    return PREFIX + name


def _reset_edits() -> None:
    for k in [k for k in st.session_state.keys() if str(k).startswith(PREFIX)]:
        del st.session_state[k]


def build_edited(base_raw: dict) -> tuple[dict, int]:
    """The what-if widgets; returns the edited raw scenario (before the step cap) and the cap."""
    import copy

    from moesim.policies.base import registry

    raw = copy.deepcopy(base_raw)
    pol = raw.get("policies") if isinstance(raw.get("policies"), dict) else {}
    raw["policies"] = pol
    c1, c2 = st.columns(2)
    with c1:
        st.markdown("**Placement and all-to-all**")
    for fam, default in (("placement", "contiguous"), ("alltoall", "direct")):
        block = pol.get(fam) if isinstance(pol.get(fam), dict) else {}
        if "kind" not in block:
            block = {**block, "kind": default}
        pol[fam] = ui.policy_editor(fam, sorted(registry(fam)), block, c1, _k)
    with c2:
        st.markdown("**Parallelism and workload**")
        par = raw.get("parallel") if isinstance(raw.get("parallel"), dict) else {}
        raw["parallel"] = par
        mb0 = int(par.get("micro_batches", 1))
        ui.init(_k("mb"), mb0)
        mb = st.number_input("micro-batches (2 = DeepSeek-V3's two-micro-batch overlap)", 1, 8, step=1,
                             key=_k("mb"))
        if int(mb) != mb0:
            par["micro_batches"] = int(mb)
        wl = raw.get("workload") if isinstance(raw.get("workload"), dict) else {}
        raw["workload"] = wl
        bs0 = int(wl.get("batch_size", 1))
        ui.init(_k("bs"), bs0)
        bs = st.number_input("batch size (sequences per attention rank)", 1, 4096, step=1, key=_k("bs"))
        if int(bs) != bs0:
            wl["batch_size"] = int(bs)
            if isinstance(wl.get("warmup_tokens"), int):  # keep the same number of warm-up steps
                wl["warmup_tokens"] = wl["warmup_tokens"] * int(bs) // max(bs0, 1)
        ui.init(_k("steps"), C.DEFAULT_CLUSTER_STEPS)
        steps = st.number_input(f"decode steps measured (cap, at most {C.HARD_MAX_CLUSTER_STEPS})", 1,
                                C.HARD_MAX_CLUSTER_STEPS, step=1, key=_k("steps"),
                                help="every run here, the starting scenario's included, stops after this many "
                                     "measured decode steps (plus its warm-up steps); keeps answers fast")
    return raw, int(steps)


def load_fig(ep: dict) -> go.Figure:
    """Per GPU over the measured steps: expert tokens (token-expert pairs computed), busy time, and
    how often it was the slowest GPU of a (layer, micro-batch); titles carry the imbalance (the
    summary's per-layer max/mean averaged over layers and steps, and max/mean of the totals)."""
    pg, imb = ep["per_gpu"], ep.get("imbalance") or {}
    load = np.asarray(pg["expert_tokens"], dtype=float)
    busy = np.asarray(pg["busy_s"], dtype=float) * 1e3
    slow = np.asarray(pg.get("straggler_count") or [], dtype=float)
    gpus = [f"gpu{g}" for g in range(len(load))]
    tot = load.max() / load.mean() if len(load) and load.mean() > 0 else float("nan")
    per_layer = imb.get("expert_tokens_max_over_mean")
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.09, subplot_titles=(
        f"expert tokens per GPU (max/mean per layer {per_layer or float('nan'):.3g}, of the totals {tot:.3g})",
        f"busy time per GPU, ms (max/mean {imb.get('busy_max_over_mean') or float('nan'):.3g})",
        "times the slowest GPU of a layer"))
    fig.add_trace(go.Bar(x=gpus, y=load, name="expert tokens", marker_color="#4c78a8"), row=1, col=1)
    fig.add_trace(go.Bar(x=gpus, y=busy, name="busy (ms)", marker_color="#f58518"), row=2, col=1)
    fig.add_trace(go.Bar(x=gpus[:len(slow)], y=slow, name="slowest", marker_color="#e45756"), row=3, col=1)
    for row, y in ((1, load), (2, busy)):
        if len(y):
            fig.add_hline(y=float(y.mean()), line_dash="dot", line_color="grey", row=row, col=1)
    fig.update_layout(height=520, margin=dict(l=10, r=10, t=40, b=10), showlegend=False)
    return fig


def traffic_fig(ep: dict) -> go.Figure:
    """Bytes sent GPU -> GPU (dispatch + combine; rows = source), or node -> node where the run
    has too many GPUs for a GPU matrix in its summary."""
    tr = ep["traffic"]
    m, unit = tr.get("gpu_matrix_bytes"), "GPU"
    if m is None:
        m, unit = tr["node_matrix_bytes"], "node"
    z = np.asarray(m, dtype=float) / 1e9
    names = [f"{unit.lower()}{i}" for i in range(z.shape[0])]
    fig = go.Figure(go.Heatmap(z=z, x=names, y=names, colorscale="Viridis", colorbar=dict(title="GB"),
                               hovertemplate="%{y} -> %{x}: %{z:.4g} GB<extra></extra>"))
    fig.update_layout(title=f"{unit}-to-{unit} traffic (GB, dispatch + combine; row = sender)", height=420,
                      margin=dict(l=10, r=10, t=40, b=10), xaxis_title="receiver", yaxis_title="sender",
                      yaxis_autorange="reversed")
    return fig


def link_class(name: str) -> str:
    """A link's group for colouring: fabric (leaf/spine switches), GPU-NIC, or inside a node."""
    if "leaf" in name or "spine" in name:
        return "fabric"
    if "nic" in name:
        return "GPU-NIC"
    return "inside node"


def links_fig(ep: dict, top: int = TOP_LINKS) -> go.Figure:
    """Utilisation of the ``top`` busiest links over the measured window."""
    links = ep.get("links") or {}
    rows = sorted(((v.get("utilization") or 0.0, k) for k, v in links.items()), reverse=True)[:top]
    fig = go.Figure()
    for cls in ("inside node", "GPU-NIC", "fabric"):
        sel = [(u, k) for u, k in rows if link_class(k) == cls]
        if sel:
            fig.add_trace(go.Bar(y=[k for _, k in sel], x=[100 * u for u, _ in sel], name=cls, orientation="h"))
    fig.update_layout(title=f"link utilisation, busiest {len(rows)} of {len(links)} links (% of the measured time)",
                      height=max(300, 16 * len(rows) + 80), margin=dict(l=10, r=10, t=40, b=10),
                      xaxis_title="% busy", yaxis=dict(autorange="reversed", categoryorder="array",
                                                       categoryarray=[k for _, k in rows]))
    return fig


def stage_fig(rows: list[tuple[str, dict, float]]) -> go.Figure:
    """Where the decode steps' time went, per run ``(label, expert_parallel block, measured ms)``:
    ``stage_ms`` stacked (attention, dispatch, experts = the busiest GPU's expert time, combine;
    summed over the measured layers and micro-batches) and a marker at the measured time. With
    micro-batches the stages overlap, so the stack is longer than the measured time by about the
    all-to-all hidden behind compute."""
    fig = go.Figure()
    labels = [lab for lab, _, _ in rows]
    for stg in STAGES:
        fig.add_trace(go.Bar(name=stg, y=labels, x=[(ep.get("stage_ms") or {}).get(stg, 0.0) for _, ep, _ in rows],
                             orientation="h"))
    fig.add_trace(go.Scatter(name="measured time", y=labels, x=[ms for _, _, ms in rows], mode="markers",
                             marker=dict(symbol="diamond", size=14, color="black")))
    hidden = ", ".join(f"{lab} {ep.get('alltoall_hidden_ms') or 0.0:.4g}" for lab, ep, _ in rows)
    fig.update_layout(barmode="stack", height=190 + 45 * len(rows), margin=dict(l=10, r=10, t=40, b=10),
                      legend=dict(orientation="h", y=-0.35),
                      title=f"stage time of the measured steps, ms (all-to-all hidden behind compute: {hidden})",
                      xaxis_title="ms")
    return fig


def render() -> None:
    st.header("Cluster")
    st.caption("A multi-GPU expert-parallel decode run: per-GPU load, GPU-to-GPU traffic, link use and the "
               "stage split. Runs are capped at the number of measured decode steps below (the scenario's "
               "warm-up steps come on top), cached by scenario hash; press Stop or change a control to cancel.")
    base_raw, label = ui.pick_scenario(
        "cl", C.bundled_of_class("cluster"), DEFAULT, accept=("cluster",),
        what="a multi-GPU decode scenario (a cluster: block and no workload.requests; serving: the Serving page)")
    if base_raw is None:
        return
    if st.session_state.get("cl_base_id") != label:
        st.session_state["cl_base_id"] = label
        _reset_edits()
    with st.expander("starting scenario", expanded=False):
        st.code(C.to_yaml(base_raw), language="yaml")
    try:
        edited, steps = build_edited(base_raw)
        sc_base = ui.validated(base_raw, "starting scenario")
        sc_edit = ui.validated(edited, "edited scenario")
        base_c = C.with_step_cap(base_raw, sc_base, steps)
        edit_c = C.with_step_cap(edited, sc_edit, steps)
        sc_b = ui.validated(base_c, "starting scenario")
        sc_e = ui.validated(edit_c, "edited scenario")
        out = ui.run(sc_e, label="edited scenario")
        same = C.scenario_key(sc_b) == C.scenario_key(sc_e)
        out_b = out if same else ui.run(sc_b, label="starting scenario")
    except InputError as exc:
        ui.show_error(exc)
        return
    s, sb = out["summary"], out_b["summary"]
    ep = s["expert_parallel"]
    st.subheader("Key figures")
    st.caption(f"{ep['gpus']} GPUs ({ep['nodes']} nodes), EP {ep['ep']} x {ep['ep_groups']}, placement "
               f"{ep['placement']['policy']}, all-to-all {ep['alltoall']['policy']}, {ep['micro_batches']} "
               f"micro-batch(es); {s['decode_steps']} decode steps ({s['warmup_steps']} warm-up), "
               f"{ep['tokens_per_step']} tokens per step. Hash {s['scenario_hash'][:8]}."
               + ("" if same else " Deltas against the starting scenario under the same cap."))
    ui.metric_row(C.cluster_figures(s), None if same else C.cluster_figures(sb), C.CLUSTER_LOWER_IS_BETTER)
    c1, c2 = st.columns(2)
    with c1:
        st.plotly_chart(load_fig(ep), width="stretch", key="cl_load")
    with c2:
        st.plotly_chart(traffic_fig(ep), width="stretch", key="cl_traffic")
    rows = [("this run" if same else "edited", ep, 1e3 * s["measured_time_s"])]
    if not same:
        rows.insert(0, ("starting", sb["expert_parallel"], 1e3 * sb["measured_time_s"]))
    st.plotly_chart(stage_fig(rows), width="stretch", key="cl_stage")
    st.plotly_chart(links_fig(ep), width="stretch", key="cl_links")
    for note in out["notes"]:
        st.caption("note: " + note)
    st.caption("routing: " + str(s.get("routing_note", "")))
    st.download_button("Download edited scenario (YAML)", C.to_yaml(edit_c), file_name=f"{sc_e.name}-edited.yaml",
                       mime="application/x-yaml", key="cl_dl_yaml")
