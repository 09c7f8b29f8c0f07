"""The dashboard under streamlit.testing.v1.AppTest: every page renders without an exception or an
error box, widgets change the figures they should, uploads are confined and validated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from dashboard import common as C  # noqa: E402
from moesim.errors import InputError  # noqa: E402

from tests.dashboard.apptest_helpers import APP  # noqa: E402
from tests.dashboard.apptest_helpers import arr as _arr  # noqa: E402
from tests.dashboard.apptest_helpers import metrics as _metrics  # noqa: E402
from tests.dashboard.apptest_helpers import ok as _ok  # noqa: E402

TIMEOUT = 180


def _fresh() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    _ok(at)
    return at



def _goto(at: AppTest, page: str) -> AppTest:
    at.sidebar.radio(key="page").set_value(page).run()
    _ok(at)
    return at




def _nbars(fig: dict) -> int:
    return sum(len(_arr(t["x"])) for t in fig["data"])


def _fig(at: AppTest, key: str | None = None, index: int = 0) -> dict:
    charts = at.get("plotly_chart")
    assert charts, "no plotly chart on the page"
    return json.loads(charts[index].proto.spec)


def test_whatif_default_runs_and_capacity_moves_the_figures():
    at = _fresh()
    m0 = _metrics(at)
    assert set(C.key_figures({"utilization": {}, "cache": {"hit_rate": 0.5}, "tpot_ms": {},
                              "throughput_tok_s": 1.0, "transfers": {"bytes_h2d": 0}})) <= set(m0)
    assert all(d in ("", None) for _, d in m0.values())  # unchanged: no deltas
    at.number_input(key="wi_e_capacity").set_value(192).run()
    _ok(at)
    m1 = _metrics(at)
    assert float(m1["hit rate (%)"][0]) > float(m0["hit rate (%)"][0])
    assert float(m1["TPOT mean (ms)"][0]) < float(m0["TPOT mean (ms)"][0])
    assert m1["TPOT mean (ms)"][1].startswith("-")  # delta against the starting scenario
    labels = [b.label for b in at.get("download_button")]
    assert any("YAML" in lab for lab in labels) and any("summary.json" in lab for lab in labels)


def test_whatif_policy_bandwidth_and_batch_edits():
    at = _fresh()
    base = _metrics(at)["TPOT mean (ms)"][0]
    at.number_input(key="wi_e_bw").set_value(16.0).run()
    _ok(at)
    slow = _metrics(at)["TPOT mean (ms)"][0]
    assert float(slow) > float(base)
    at.selectbox(key="wi_e_cache").set_value("lfu").run()
    _ok(at)
    at.selectbox(key="wi_e_execution").set_value("fiddler").run()
    _ok(at)
    assert float(_metrics(at)["CPU util (%)"][0]) > 0
    at.number_input(key="wi_e_bs").set_value(2).run()
    _ok(at)
    at.selectbox(key="wi_e_trace").set_value("synthetic").run()
    _ok(at)


def test_whatif_invalid_edit_is_one_line_error():
    at = _fresh()
    at.selectbox(key="wi_e_model").set_value("switch-base-8").run()  # mixtral trace, switch model
    assert not at.exception
    at.number_input(key="wi_e_capacity").set_value(1).run()  # below top-k
    assert not at.exception
    assert at.error and all("\n" not in e.value for e in at.error)


def test_timeline_page_window_changes_bars():
    at = _goto(_fresh(), "Timeline")
    f0 = _fig(at)
    n0 = _nbars(f0)
    assert 0 < n0 <= 3000
    names = {t["name"] for t in f0["data"]}
    assert {"dense", "copy"} <= names
    at.number_input(key="tl_count").set_value(1).run()
    _ok(at)
    n1 = _nbars(_fig(at))
    assert 0 < n1 < n0
    at.number_input(key="tl_count").set_value(200).run()  # a wide window is capped, with a warning
    _ok(at)
    assert _nbars(_fig(at)) <= 3000
    assert at.warning


def test_timeline_window_function_caps():
    import pandas as pd

    from dashboard.views.timeline import window

    df = pd.DataFrame({"resource": ["gpu0.compute"] * 10, "kind": ["dense"] * 10,
                       "start_s": range(10), "end_s": range(1, 11), "step": range(10),
                       "layer": [0] * 10, "expert": [-1] * 10, "bytes": [0] * 10})
    sel, n = window(df, (2, 8), (0, 0), ["gpu0.compute"], cap=3)
    assert n == 7 and list(sel["step"]) == [2, 3, 4]


def test_curves_page_and_capacity_list():
    at = _goto(_fresh(), "Curves")
    assert len(at.get("plotly_chart")) == 3  # hit rate, TPOT vs capacity, TPOT vs bandwidth
    hit = _fig(at, index=0)
    assert {t["name"] for t in hit["data"]} == {"lru", "lfu", "belady"}
    at.text_input(key="cv_caps").set_value("64, 128").run()
    _ok(at)
    hit2 = _fig(at, index=0)
    assert _arr(hit2["data"][0]["x"]) == [64, 128]
    belady = next(t for t in hit2["data"] if t["name"] == "belady")
    lru = next(t for t in hit2["data"] if t["name"] == "lru")
    assert _arr(belady["y"])[0] >= _arr(lru["y"])[0]  # the offline optimum is never worse
    tp = _fig(at, index=1)
    assert all(_arr(t["y"])[0] >= _arr(t["y"])[1] for t in tp["data"])  # more slots, no slower
    at.text_input(key="cv_caps").set_value("zero").run()
    assert not at.exception and at.error


def test_compare_page_three_configs():
    at = _goto(_fresh(), "Compare")
    at.slider(key="cmp_n").set_value(3).run()
    _ok(at)
    assert len(at.dataframe) == 1 and len(at.dataframe[0].value) == 3
    cdf = json.loads(at.get("plotly_chart")[-1].proto.spec)
    assert len(cdf["data"]) == 3 and _arr(cdf["data"][0]["y"])[-1] == pytest.approx(1.0)
    at.selectbox(key="cmp_1").set_value("(the What-if scenario)").run()
    _ok(at)


def test_trace_explorer_switches_traces():
    at = _goto(_fresh(), "Trace explorer")
    heat = _fig(at, index=0)
    shape0 = (_arr(heat["data"][0]["y"]), _arr(heat["data"][0]["x"]))
    at.selectbox(key="tr_choice").set_value("switch-base-8.npz").run()
    _ok(at)
    heat1 = _fig(at, index=0)
    assert (_arr(heat1["data"][0]["y"]), _arr(heat1["data"][0]["x"])) != shape0
    assert at.dataframe  # basic_stats table


def test_calibration_page_without_report(tmp_path, monkeypatch):
    at = _goto(_fresh(), "Calibration")
    from dashboard.views.calibration import NO_REPORT, latest_report

    if latest_report() is None:
        assert any(NO_REPORT in i.value for i in at.info)
    (tmp_path / "reports").mkdir()
    assert latest_report(tmp_path) is None
    (tmp_path / "reports" / "r.md").write_text("# measured vs simulated\n")
    assert latest_report(tmp_path).name == "r.md"


# ----- uploads -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, what", [
    ("include: [../../etc/passwd]\n", "outside the bundled scenarios"),
    ("include: [/etc/hostname]\n", "outside the bundled scenarios"),
    ("include: [presets/../../pyproject.toml]\n", "outside the bundled scenarios"),
    ("include: [presets/mixtral-8x7b-h100.yaml]\ntrace: {path: /etc/passwd}\n", "outside the bundled traces"),
    ("include: [presets/mixtral-8x7b-h100.yaml]\ntrace: {path: ../README.md}\n", "outside the bundled traces"),
])
def test_upload_path_escape_rejected(text, what):
    with pytest.raises(InputError, match=what):
        C.parse_uploaded_yaml(text.encode(), "evil.yaml")


def test_upload_good_and_bad_yaml():
    good = (C.SCENARIOS_DIR / "mixtral-8x7b-h100-lru-c96.yaml").read_bytes()
    raw = C.parse_uploaded_yaml(good, "mine.yaml")
    assert Path(raw["trace"]["path"]).is_file()
    C.validate_raw(raw)
    with pytest.raises(InputError, match="larger than"):
        C.parse_uploaded_yaml(b"a: 1\n" * 100_000, "big.yaml")
    with pytest.raises(InputError, match="line"):
        C.parse_uploaded_yaml(b"a: [1, 2\n", "broken.yaml")
    with pytest.raises(InputError, match="mapping"):
        C.parse_uploaded_yaml(b"- 1\n- 2\n", "list.yaml")
    with pytest.raises(InputError):
        C.parse_uploaded_yaml(b"!!python/object/apply:os.system ['true']\n", "unsafe.yaml")


def test_uploaded_trace_checked(tmp_path):
    with pytest.raises(InputError):
        C.save_uploaded_trace(b"not a zip", "x.npz")
    p = C.save_uploaded_trace((C.TRACES_DIR / "switch-base-8.npz").read_bytes(), "sb8.npz")
    assert p.is_file()


def _upload_app(content: bytes, name: str):  # runs as an AppTest script
    import streamlit as st

    from dashboard.views import whatif

    class _Up:
        def __init__(self):
            self.name = name

        def getvalue(self):
            return content

    real = st.file_uploader
    st.file_uploader = lambda *a, **k: _Up() if k.get("key") == "wi_upload" else real(*a, **k)
    try:
        whatif.render()
    finally:
        st.file_uploader = real


@pytest.mark.parametrize("content", [
    b"include: [../../../etc/passwd]\n",
    b"policies: {cache: {kind: lru, capacity_experts: -3}}\n",
    b"model: {preset: no-such-model}\n",
    b"\xff\xfe not utf8",
    b"a: [1, 2\n",
])
def test_bad_upload_shows_error_not_exception(content):
    at = AppTest.from_function(_upload_app, args=(content, "bad.yaml"), default_timeout=TIMEOUT)
    at.session_state["wi_src"] = "uploaded YAML"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.error and all("\n" not in e.value and "Traceback" not in e.value for e in at.error)


def test_good_upload_runs():
    content = (C.SCENARIOS_DIR / "mixtral-8x7b-h100-lru-c32.yaml").read_bytes()
    at = AppTest.from_function(_upload_app, args=(content, "mine.yaml"), default_timeout=TIMEOUT)
    at.session_state["wi_src"] = "uploaded YAML"
    at.run()
    _ok(at)
    assert "hit rate (%)" in _metrics(at)


def test_multi_gpu_scenarios_are_not_offered():
    names = C.bundled_scenarios()
    assert "mixtral-8x7b-h100-lru-c96" in names
    assert not any(n.startswith(("deepseek-v3-4x8h100", "mixtral-8x22b-ep8", "qwen3-30b-a3b-2x8h100")) for n in names)
