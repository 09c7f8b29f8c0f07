"""moesim dashboard: ``moesim dashboard`` or ``streamlit run dashboard/app.py``.

One page at a time, chosen in the sidebar; each page is a module under ``dashboard/views``.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:  # `streamlit run dashboard/app.py` puts dashboard/ (not the checkout) on sys.path
    import dashboard  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the app is started
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import streamlit as st

from dashboard.views import calibration, cluster, compare, curves, serving, timeline, trace, whatif

PAGES = {
    "What-if": whatif,
    "Timeline": timeline,
    "Curves": curves,
    "Compare": compare,
    "Trace explorer": trace,
    "Calibration": calibration,
    "Cluster": cluster,
    "Serving": serving,
}


def main() -> None:
    st.set_page_config(page_title="moesim dashboard", layout="wide")
    # keep the What-if, Cluster and Serving edits when another page is shown (widget state is
    # dropped otherwise)
    for k in list(st.session_state.keys()):
        if str(k).startswith(("wi_e_", "wi_base", "wi_auto", "wi_src", "cl_e_", "cl_base", "cl_src", "sv_e_",
                              "sv_base", "sv_src")):
            st.session_state[k] = st.session_state[k]
    with st.sidebar:
        st.title("moesim")
        page = st.radio("Page", list(PAGES), key="page")
        st.caption("Discrete-event simulation of MoE inference. Runs are capped and cached by scenario hash.")
    try:
        PAGES[page].render()
    except Exception as exc:  # a bug or an unexpected input: one line, never a traceback
        from streamlit.runtime.scriptrunner import RerunException, StopException

        if isinstance(exc, (RerunException, StopException)):
            raise
        from dashboard.ui import show_error

        show_error(exc)


main()
