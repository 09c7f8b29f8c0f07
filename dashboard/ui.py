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


def run(sc, *, timeline: bool = False, label: str = "simulating") -> dict:
    """Run (or fetch from the cache) scenario ``sc`` with a visible progress bar."""
    key = C.scenario_key(sc)
    bar = st.progress(0.0, text=f"{label}: starting")

    def progress(done: int, total: int) -> None:
        bar.progress(min(1.0, done / max(total, 1)), text=f"{label}: decode step {done}/{total}")

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
