"""Calibration: the latest validate/ comparison report (measured vs simulated), when one exists."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import streamlit as st

from dashboard import common as C

NO_REPORT = "No calibration report yet"


def latest_report(root: Path | None = None) -> Path | None:
    """The newest ``validate/reports/*.json`` or ``*.md`` (by modification time), or None."""
    d = (root or C.VALIDATE_DIR) / "reports"
    if not d.is_dir():
        return None
    files = [p for p in d.iterdir() if p.is_file() and p.suffix in (".json", ".md")]
    return max(files, key=lambda p: p.stat().st_mtime) if files else None


def render() -> None:
    st.header("Calibration")
    rep = latest_report()
    if rep is None:
        st.info(f"{NO_REPORT}: the calibration harness (validate/) writes its measured-vs-simulated "
                f"comparison to {C.VALIDATE_DIR / 'reports'}/*.json or *.md; this page shows the newest one.")
        return
    st.caption(f"report: {rep.name}")
    if rep.suffix == ".md":
        st.markdown(rep.read_text(encoding="utf-8", errors="replace")[:200_000])
        return
    try:
        data = json.loads(rep.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        st.error(f"{rep.name}: not valid JSON ({exc})")
        return
    rows = data.get("rows") or data.get("comparisons") if isinstance(data, dict) else data
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        st.dataframe(pd.DataFrame(rows), width="stretch")
    st.json(data, expanded=False)
