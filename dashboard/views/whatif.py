"""What-if: start from a bundled or uploaded scenario, change one thing, see why the answer moved."""

from __future__ import annotations

import copy
import json

import plotly.graph_objects as go
import streamlit as st

from dashboard import common as C
from dashboard import ui
from moesim.errors import InputError

AS_IS = "(as in scenario)"
EDIT_KEYS_PREFIX = "wi_e_"  # edit widgets: reset when the starting scenario changes


def _k(name: str) -> str:
    return EDIT_KEYS_PREFIX + name


def _init(key: str, value) -> None:
    if key not in st.session_state:
        st.session_state[key] = value


def _reset_edits() -> None:
    for k in [k for k in st.session_state.keys() if str(k).startswith(EDIT_KEYS_PREFIX)]:
        del st.session_state[k]


def _base() -> tuple[dict | None, str]:
    """The starting scenario (raw mapping) and its label, from the source picker."""
    return ui.pick_scenario("wi", C.bundled_scenarios(), C.DEFAULT_SCENARIO, accept=C.SINGLE_GPU_CLASSES,
                            what="a single-GPU scenario (multi-GPU runs: the Cluster and Serving pages)",
                            raw_key="uploaded_raw", label_key="uploaded_label")


def _trace_upload() -> None:
    up = st.file_uploader(f"Upload a trace (.npz, at most {C.MAX_TRACE_UPLOAD_BYTES // 2**20} MiB)",
                          type=["npz"], key="wi_trace_upload")
    if up is not None:
        try:
            st.session_state["uploaded_trace_path"] = str(C.save_uploaded_trace(up.getvalue(), up.name))
            st.session_state["uploaded_trace_name"] = up.name
        except InputError as exc:
            st.session_state.pop("uploaded_trace_path", None)
            st.error(exc.line())


def _block(raw: dict, name: str) -> dict:
    b = raw.get(name)
    if isinstance(b, str):
        b = {"preset": b}
    if not isinstance(b, dict):
        b = {}
    raw[name] = b
    return b


def build_edited(base_raw: dict) -> tuple[dict, int]:
    """The edit widgets; returns the edited raw scenario (before the token cap) and the cap."""
    from moesim.hardware.presets import list_hardware_presets
    from moesim.models.presets import list_model_presets
    from moesim.policies.base import registry

    raw = copy.deepcopy(base_raw)
    c1, c2, c3 = st.columns(3)
    with c1:
        st.markdown("**Model and machine**")
        _init(_k("model"), AS_IS)
        model = st.selectbox("model preset", [AS_IS] + list_model_presets(), key=_k("model"))
        _init(_k("hw"), AS_IS)
        hw = st.selectbox("hardware preset", [AS_IS] + list_hardware_presets(), key=_k("hw"))
        if model != AS_IS:
            raw["model"] = {"preset": model}
        if hw != AS_IS:
            raw["hardware"] = {"preset": hw}
        # defaults of the link and memory for the chosen machine
        try:
            hw_res = C.validate_raw(C.with_token_cap(raw, C.DEFAULT_MAX_TOKENS)).hardware
            bw0 = float(hw_res.link.h2d_bandwidth_gb_s)
            hbm0 = float(hw_res.gpu.hbm_gib)
        except InputError:
            bw0, hbm0 = 32.0, 80.0
        if st.session_state.get(_k("hw_defaults")) != (hw, model, bw0, hbm0):
            st.session_state[_k("hw_defaults")] = (hw, model, bw0, hbm0)
            st.session_state[_k("bw")] = bw0
            st.session_state[_k("hbm")] = hbm0
        bw = st.number_input("link host->GPU bandwidth (GB/s)", min_value=0.1, max_value=2000.0,
                             key=_k("bw"), format="%.2f")
        hbm = st.number_input("GPU memory (GiB)", min_value=1.0, max_value=4096.0, key=_k("hbm"), format="%.2f")
        if abs(bw - bw0) > 1e-9:
            _block(_block(raw, "hardware"), "link")["h2d_bandwidth_gb_s"] = float(bw)
        if abs(hbm - hbm0) > 1e-9:
            _block(_block(raw, "hardware"), "gpu")["hbm_gib"] = float(hbm)
    pol = raw.setdefault("policies", {}) if isinstance(raw.get("policies"), dict) else {}
    raw["policies"] = pol
    with c2:
        st.markdown("**Policies**")
    for fam, col in (("cache", c2), ("prefetch", c2), ("execution", c2)):
        kinds = sorted(registry(fam))
        # a family the scenario leaves out starts at the schema's default kind (not the first listed)
        default_kind = {"cache": kinds[0], "prefetch": "none", "execution": "gpu_only"}[fam]
        base_block = pol.get(fam) if isinstance(pol.get(fam), dict) else {}
        if "kind" not in base_block:
            base_block = {**base_block, "kind": default_kind}
        pol[fam] = ui.policy_editor(fam, kinds, base_block, col, _k)
    with c3:
        st.markdown("**Workload and trace**")
        wl = _block(raw, "workload")
        bs0 = int(wl.get("batch_size", 1))
        _init(_k("bs"), bs0)
        bs = st.number_input("batch size", min_value=1, max_value=512, step=1, key=_k("bs"))
        if int(bs) != bs0:
            wl["batch_size"] = int(bs)
        _init(_k("tokens"), C.DEFAULT_MAX_TOKENS)
        cap = st.number_input(f"max tokens (cap, at most {C.HARD_MAX_TOKENS})", min_value=C.MIN_MAX_TOKENS,
                              max_value=C.HARD_MAX_TOKENS, step=64, key=_k("tokens"),
                              help="every run here, the starting scenario's included, stops after this many "
                                   "decode tokens; keeps answers fast")
        options = [AS_IS] + C.bundled_traces() + ["synthetic"]
        if st.session_state.get("uploaded_trace_path"):
            options.append("uploaded: " + st.session_state.get("uploaded_trace_name", "trace.npz"))
        _init(_k("trace"), AS_IS)
        if st.session_state[_k("trace")] not in options:
            st.session_state[_k("trace")] = AS_IS
        tr = st.selectbox("trace", options, key=_k("trace"))
        if tr == "synthetic":
            _init(_k("zipf"), 1.0)
            _init(_k("reuse"), 0.3)
            z = st.slider("Zipf exponent", 0.0, 2.0, key=_k("zipf"), step=0.1)
            rp = st.slider("reuse probability", 0.0, 1.0, key=_k("reuse"), step=0.05)
            raw["trace"] = {"synthetic": {"tokens": 4096, "zipf_s": float(z), "reuse_prob": float(rp)}}
        elif tr.startswith("uploaded: "):
            raw["trace"] = {"path": st.session_state["uploaded_trace_path"]}
        elif tr != AS_IS:
            raw["trace"] = {"path": str(C.TRACES_DIR / tr)}
        _trace_upload()
    return raw, int(cap)


def _critical_path_fig(base_s: dict, s: dict):
    keys = ("gpu_compute", "copy_wait", "host", "cpu_expert", "comm", "idle")
    fig = go.Figure()
    for k in keys:
        per_tok = [x["critical_path_ms"][k] / max(x["tokens"], 1) for x in (base_s, s)]
        fig.add_trace(go.Bar(name=k, y=["starting", "edited"], x=per_tok, orientation="h"))
    fig.update_layout(barmode="stack", height=230, margin=dict(l=10, r=10, t=30, b=10),
                      title="where the time went (ms per token)", xaxis_title="ms per token")
    return fig


def render() -> None:
    st.header("What-if")
    st.caption("Change one thing and see why the answer moved. Every run is capped at the token budget "
               "below and cached by scenario hash; press Stop (top right) or change a control to cancel "
               "a running simulation.")
    base_raw, label = _base()
    if base_raw is None:
        return
    if st.session_state.get("wi_base_id") != label:
        st.session_state["wi_base_id"] = label
        _reset_edits()
    with st.expander("starting scenario", expanded=False):
        st.code(C.to_yaml(base_raw), language="yaml")
    try:
        edited, cap = build_edited(base_raw)
    except InputError as exc:
        ui.show_error(exc)
        return
    edited_capped = C.with_token_cap(edited, cap)
    base_capped = C.with_token_cap(base_raw, cap)
    edited_capped["name"] = str(edited_capped.get("name", "scenario"))
    st.session_state["whatif_raw"] = edited_capped
    st.session_state["whatif_label"] = f"what-if ({edited_capped['name']})"
    c_auto, c_run = st.columns([3, 1])
    with c_auto:
        _init("wi_auto", True)
        auto = st.checkbox("run automatically when a control changes", key="wi_auto")
    with c_run:
        clicked = st.button("Run", type="primary", key="wi_run")
    if not (auto or clicked):
        st.info("Press Run to simulate.")
        return
    try:
        sc = ui.validated(edited_capped, "edited scenario")
        sc_base = ui.validated(base_capped, "starting scenario")
        out_base = ui.run(sc_base, label="starting scenario")
        out = ui.run(sc, label="edited scenario")
    except InputError as exc:
        ui.show_error(exc)
        return
    s, sb = out["summary"], out_base["summary"]
    st.subheader("Key figures")
    st.caption(f"{s['tokens']} measured tokens ({s['decode_steps']} decode steps, {s['warmup_steps']} warm-up); "
               f"deltas against the starting scenario under the same token cap. Hash {s['scenario_hash'][:8]}.")
    ui.metric_row(C.key_figures(s), C.key_figures(sb))
    tp_rows = {lab: C.throughput_figures(x) for lab, x in (("starting", sb), ("edited", s))}
    if any(tp_rows.values()):
        st.markdown("**Throughput engine** (the run's `throughput` block)")
        st.dataframe(C.throughput_table(tp_rows), width="stretch", key="wi_tp")
    st.plotly_chart(_critical_path_fig(sb, s), width="stretch", key="wi_cp")
    for note in out["notes"]:
        st.caption("note: " + note)
    d1, d2 = st.columns(2)
    with d1:
        st.download_button("Download edited scenario (YAML)", C.to_yaml(edited_capped),
                           file_name=f"{edited_capped['name']}-edited.yaml", mime="application/x-yaml",
                           key="wi_dl_yaml")
    with d2:
        st.download_button("Download summary.json", json.dumps(s, indent=2), file_name="summary.json",
                           mime="application/json", key="wi_dl_json")
