"""Streamlit-side helpers: cached runs with a progress bar, the working scenario shared by pages.

Runs are cached by the scenario hash (``moesim.config.loader.scenario_hash``: resolved scenario plus
the trace file's sha256) with ``st.cache_data``. Cancellation: the progress callback touches a
Streamlit element every 64 decode steps; when the user presses *Stop* or changes a widget, Streamlit
raises its stop/rerun exception at that call, which unwinds the simulation (nothing is cached).
Each browser session runs its script in its own thread, so a run never blocks other sessions, but it
shares the Python interpreter (GIL) with them: runs are bounded by a token cap (default
``DEFAULT_MAX_TOKENS``, at most ``HARD_MAX_TOKENS``).
"""

from __future__ import annotations

import copy

import streamlit as st

from dashboard import common as C
from moesim.errors import InputError


class _Miss(Exception):
    """Raised inside the cached store on a miss (exceptions are not cached)."""


@st.cache_data(max_entries=64, show_spinner=False)
def _store(key: str, kind: str, _value=None):
    """The cache proper, keyed by (key, kind): a miss raises, a second call with ``_value`` stores it.
    The computation itself runs outside the cached function, so its progress bar may update a block
    created outside (st.cache_data refuses that inside a cached function)."""
    if _value is None:
        raise _Miss
    return _value


def cached(key: str, kind: str, compute):
    """``compute()`` once per (key, kind); later calls get the cached copy."""
    try:
        return _store(key, kind)
    except _Miss:
        pass
    return _store(key, kind, compute())


def run(sc, *, timeline: bool = False, label: str = "simulating", unit: str = "decode step") -> dict:
    """Run (or fetch from the cache) scenario ``sc`` with a visible progress bar (``unit``: what the
    engine's progress counts: decode steps, or finished requests in a serving run)."""
    key = C.scenario_key(sc)
    bar = st.progress(0.0, text=f"{label}: starting")

    def progress(done: int, total: int) -> None:
        bar.progress(min(1.0, done / max(total, 1)), text=f"{label}: {unit} {done}/{total}")

    try:
        return cached(key, f"run:timeline={timeline}", lambda: C.simulate_slim(sc, timeline=timeline, progress=progress))
    finally:
        bar.empty()


def show_error(exc: BaseException) -> None:
    """One line in the page: InputError's own line, else the exception's type and message."""
    if isinstance(exc, InputError):
        st.error(exc.line())
    else:
        st.error(f"{type(exc).__name__}: {exc}")


def working_raw() -> tuple[dict, str]:
    """The scenario the What-if page has built (edited raw mapping, label); the default bundled
    scenario with the default token cap before the What-if page has run."""
    raw = st.session_state.get("whatif_raw")
    if raw is not None:
        return raw, st.session_state.get("whatif_label", "what-if")
    return C.with_token_cap(C.load_bundled(C.DEFAULT_SCENARIO), C.DEFAULT_MAX_TOKENS), C.DEFAULT_SCENARIO


def extra_traces() -> tuple:
    """The trace files this session uploaded (allowed as trace paths besides traces/)."""
    p = st.session_state.get("uploaded_trace_path")
    return (p,) if p else ()


def validated(raw: dict, source: str = "dashboard"):
    C.check_trace_allowed(raw, source=source, extra_allowed=extra_traces())
    return C.validate_raw(raw, source)


def pick_scenario(prefix: str, names: list[str], default: str, *, accept: tuple = (), what: str = "",
                  raw_key: str | None = None, label_key: str | None = None) -> tuple[dict | None, str]:
    """The source picker of a page: a bundled scenario from ``names`` or an uploaded YAML (parsed and
    confined by :func:`dashboard.common.parse_uploaded_yaml`). Returns (merged raw mapping, label),
    or (None, "") when there is nothing to run yet (an error or hint is shown).

    Widget keys are ``<prefix>_src``, ``<prefix>_base`` and ``<prefix>_upload``; the parsed upload is
    kept in ``raw_key`` / ``label_key`` (default ``<prefix>_uploaded_raw`` / ``..._label``). With
    ``accept`` (values of :func:`dashboard.common.scenario_class`), an upload of another class is
    refused with one line naming ``what`` the page expects."""
    import hashlib

    raw_key = raw_key or f"{prefix}_uploaded_raw"
    label_key = label_key or f"{prefix}_uploaded_label"
    src = st.radio("Start from", ["bundled scenario", "uploaded YAML"], key=f"{prefix}_src", horizontal=True)
    if src == "bundled scenario":
        if not names:
            st.error("no bundled scenarios of this kind found in " + str(C.SCENARIOS_DIR))
            return None, ""
        if st.session_state.get(f"{prefix}_base") not in names:
            st.session_state[f"{prefix}_base"] = default if default in names else names[0]
        name = st.selectbox("Scenario", names, key=f"{prefix}_base")
        return C.load_bundled(name), name
    up = st.file_uploader(
        f"Scenario YAML (at most {C.MAX_YAML_UPLOAD_BYTES // 1024} KiB; include: and trace paths only "
        "into the bundled scenarios/ and traces/)", type=["yaml", "yml"], key=f"{prefix}_upload")
    if up is not None:
        data = up.getvalue()
        try:
            raw = C.parse_uploaded_yaml(data, up.name)
            if accept and C.scenario_class(raw) not in accept:
                raise InputError(f"not {what}; this page runs only those", source=f"{C.UPLOAD_SOURCE} {up.name}")
            st.session_state[raw_key] = raw
            st.session_state[label_key] = f"upload:{up.name}:{hashlib.sha256(data).hexdigest()[:8]}"
        except InputError as exc:
            st.session_state.pop(raw_key, None)
            st.error(exc.line())
            return None, ""
    raw = st.session_state.get(raw_key)
    if raw is None:
        st.info("Upload a scenario YAML to start from it.")
        return None, ""
    return copy.deepcopy(raw), st.session_state[label_key]


def init(key: str, value) -> None:
    """Give widget ``key`` its first value (later reruns keep the user's)."""
    if key not in st.session_state:
        st.session_state[key] = value


def policy_editor(fam: str, kinds: list[str], base_block: dict, col, key) -> dict:
    """Kind selector plus its simple parameters (widget keys ``key(name)``); returns the policy
    block to use: the scenario's block while its kind is kept, else the new kind's defaults plus the
    edited parameters (as ``--set policies.<family>.kind=...`` does)."""
    base_kind = base_block.get("kind", kinds[0])
    with col:
        init(key(fam), base_kind if base_kind in kinds else kinds[0])
        kind = st.selectbox(f"{fam} policy", kinds, key=key(fam))
        block = copy.deepcopy(base_block) if kind == base_kind else {"kind": kind}
        if fam == "cache" and C.has_capacity(kind):
            cap0 = base_block.get("capacity_experts") if kind == base_kind else None
            cap_default = int(base_block.get("capacity_experts") or 96)
            init(key("capacity"), cap_default)
            cap = st.number_input("cache capacity (expert slots)", min_value=1, max_value=65536, step=8,
                                  key=key("capacity"))
            if cap0 is None or int(cap) != int(cap0):
                block["capacity_experts"] = int(cap)
                block.pop("capacity_gib", None)
        fields = C.policy_fields(fam, kind)
        if fields:
            with st.expander(f"{kind} parameters"):
                for fname, (typ, default, choices) in fields.items():
                    cur = block.get(fname, default)
                    wkey = key(f"{fam}_{kind}_{fname}")
                    if choices is not None:
                        init(wkey, cur if cur in choices else choices[0])
                        v = st.selectbox(fname, choices, key=wkey)
                    elif typ is bool:
                        init(wkey, bool(cur))
                        v = st.checkbox(fname, key=wkey)
                    elif typ is int:
                        init(wkey, int(cur))
                        v = int(st.number_input(fname, step=1, key=wkey))
                    else:
                        init(wkey, float(cur))
                        v = float(st.number_input(fname, key=wkey, format="%.4g"))
                    if v != cur:
                        block[fname] = v
    return block


def metric_row(figs: dict, base: dict | None, lower_is_better: set | frozenset = frozenset(C.LOWER_IS_BETTER)) -> None:
    """``st.metric`` per headline number (None shows n/a), with the delta against ``base`` where given;
    a fall is shown green for the names in ``lower_is_better``."""
    cols = st.columns(len(figs) // 2 + len(figs) % 2)
    for i, (name, v) in enumerate(figs.items()):
        b = None if base is None else base.get(name)
        delta = None
        if v is not None and b is not None and abs(v - b) > 1e-12:
            delta = f"{v - b:+.4g}"
        with cols[i % len(cols)]:
            st.metric(name, "n/a" if v is None else f"{v:.4g}", delta=delta,
                      delta_color="inverse" if name in lower_is_better else "normal")
