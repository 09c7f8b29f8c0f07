"""Helpers shared by the dashboard's AppTest files: the app path, the no-error check, metric
values and plotly arrays read back from a figure's JSON."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "dashboard" / "app.py")


def ok(at) -> None:
    """The page ran without an exception or an error message."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def metrics(at) -> dict:
    """``{label: (value, delta)}`` of every ``st.metric`` on the page."""
    return {m.label: (m.value, m.delta) for m in at.metric}


def arr(a) -> list:
    """A plotly array from a figure's JSON: plain list, or plotly's typed-array encoding."""
    if isinstance(a, dict) and "bdata" in a:
        return np.frombuffer(base64.b64decode(a["bdata"]), dtype=np.dtype(a["dtype"])).tolist()
    return list(a)
