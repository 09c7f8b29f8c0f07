"""JSONL form, per-layer expert lists, padding detection and ``moesim trace convert`` formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.cli import main
from moesim.errors import InputError
from moesim.traces import (
    Trace,
    from_parquet_long,
    load_trace,
    save_trace,
    synthesize,
    to_parquet_long,
)
from moesim.traces.convert import (
    PADDING_MIN_RUN,
    detect_padding,
    drop_padding,
    from_jsonl,
    from_layer_lists,
    guess_input_format,
    to_jsonl,
)

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = sorted((ROOT / "traces").glob("*.npz"))
SWITCH_JSON = ROOT / "traces" / "raw" / "switch-base-8" / "router-trace.v2.json"


def full_trace(T=50, seed=0) -> Trace:
    rng = np.random.default_rng(seed)
    tr = synthesize(num_tokens=T, layers=[1, 3, 5], num_experts=8, top_k=2, seed=seed)
    tr.experts[3, 1, 1] = -1  # dynamic top-k slot
    tr.weights = rng.random(tr.experts.shape).astype(np.float16)
    tr.weights[3, 1, 1] = 0  # Parquet long form carries no weight for a -1 slot (it reads back 0)
    tr.request = np.repeat(np.arange(5, dtype=np.int32), T // 5)
    tr.token = np.tile(np.arange(T // 5, dtype=np.int32), 5)
    tr.step = np.arange(T, dtype=np.int32)
    tr.phase = (tr.token > 2).astype(np.int8)
    return tr


def same_arrays(a: Trace, b: Trace, names=("experts", "weights", "request", "token", "step", "phase")):
    for n in names:
        x, y = getattr(a, n), getattr(b, n)
        assert (x is None) == (y is None), n
        if x is not None:
            assert x.dtype == y.dtype, n
            np.testing.assert_array_equal(x, y, err_msg=n)


def test_round_trips_npz_jsonl_parquet_preserve_arrays(tmp_path):
    tr = full_trace()
    save_trace(tr, tmp_path / "a.npz")
    a = load_trace(tmp_path / "a.npz")
    to_jsonl(a, tmp_path / "b.jsonl")
    b = from_jsonl(tmp_path / "b.jsonl")
    same_arrays(a, b)
    to_parquet_long(b, tmp_path / "c.parquet")
    c = from_parquet_long(tmp_path / "c.parquet")
    same_arrays(a, c)
    to_jsonl(c, tmp_path / "d.jsonl")
    d = from_jsonl(tmp_path / "d.jsonl")
    same_arrays(a, d)
    save_trace(d, tmp_path / "e.npz")
    same_arrays(a, load_trace(tmp_path / "e.npz"))
    assert d.meta["layers"] == [1, 3, 5] and d.meta["dropped_rows"] == 0


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.name)
def test_bundled_traces_round_trip_and_have_no_padding(path, tmp_path):
    tr = load_trace(path)
    mask, n = detect_padding(tr.experts, weights=tr.weights)
    assert n == 0 and not mask.any()
    to_jsonl(tr, tmp_path / "t.jsonl")
    back = from_jsonl(tmp_path / "t.jsonl")
    same_arrays(tr, back)
    assert back.meta["dropped_rows"] == 0


def test_jsonl_without_header_minimal_rows(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"experts": [[1, 2], [3]]}\n\n{"experts": [[0], [3, 2]], "extra": 1}\n')
    tr = from_jsonl(p, model="m")
    assert tr.experts.tolist() == [[[1, 2], [3, -1]], [[0, -1], [3, 2]]]
    assert tr.meta["model"] == "m" and tr.meta["top_k"] == 2 and tr.request is None


def test_layer_lists_hand_made(tmp_path):
    p = tmp_path / "ll.json"
    p.write_text(json.dumps({"0": [[3, 5], [1, 2], [0, 7]], "2": [[1, 0], 4, [6, 5]]}))
    tr = from_layer_lists(p, num_experts=8)
    assert tr.meta["layers"] == [0, 2] and tr.meta["num_experts"] == 8
    assert tr.experts.tolist() == [[[3, 5], [1, 0]], [[1, 2], [4, -1]], [[0, 7], [6, 5]]]
    # wrapped form with names, and the JSONL one-layer-per-line form give the same
    q = tmp_path / "wrapped.json"
    q.write_text(json.dumps({"model": "x", "num_experts": 8, "layers": {"layer_2": [[1, 0], [4], [6, 5]], "layer_0": [[3, 5], [1, 2], [0, 7]]}}))
    w = from_layer_lists(q)
    np.testing.assert_array_equal(w.experts, tr.experts)
    assert w.meta["model"] == "x"
    r = tmp_path / "ll.jsonl"
    r.write_text('{"layer": 2, "experts": [[1, 0], [4], [6, 5]]}\n{"0": [[3, 5], [1, 2], [0, 7]]}\n')
    assert guess_input_format(r) == "layer-lists" and guess_input_format(p) == "layer-lists"
    np.testing.assert_array_equal(from_layer_lists(r).experts, tr.experts)


@pytest.mark.parametrize(
    "doc, field",
    [
        ({"0": [[1]], "1": [[1], [2]]}, "layers.1"),
        ({"0": [[1, "a"]]}, "layers.0[0]"),
        ({"0": []}, "layers.0"),
        ({"x": [[1]]}, "layers"),
        ({"0": [[1, 1]]}, "experts"),
    ],
)
def test_layer_lists_errors(tmp_path, doc, field):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(InputError) as ei:
        from_layer_lists(p)
    assert ei.value.field == field and str(p) in str(ei.value)


def injected(n_pad=1000):
    tr = full_trace(T=100)
    e, w = tr.experts, tr.weights
    pad_e = np.repeat(e[40:41], n_pad, axis=0)
    pad_w = np.repeat(w[40:41], n_pad, axis=0)
    out = Trace(experts=np.concatenate([e[:50], pad_e, e[50:]]), weights=np.concatenate([w[:50], pad_w, w[50:]]), meta=dict(tr.meta))
    return tr, out


def test_padding_run_of_1000_is_dropped_and_counted(tmp_path):
    orig, tr = injected()
    mask, n = detect_padding(tr.experts, weights=tr.weights)
    assert n == 1000 and mask[50:1050].all() and not mask[:50].any() and not mask[1050:].any()
    out = drop_padding(tr)
    np.testing.assert_array_equal(out.experts, orig.experts)
    assert out.meta["dropped_rows"] == 1000 and "identical" in out.meta["dropped_reason"]
    kept = drop_padding(injected()[1], keep_padding=True)
    assert kept.num_tokens == 1100 and kept.meta["dropped_rows"] == 0 and "kept 1000" in kept.meta["dropped_reason"]
    # through the JSONL reader and the CLI
    to_jsonl(Trace(experts=tr.experts, weights=tr.weights, meta={}), tmp_path / "p.jsonl")
    r = from_jsonl(tmp_path / "p.jsonl")
    assert r.num_tokens == 100 and r.meta["dropped_rows"] == 1000
    assert main(["trace", "convert", str(tmp_path / "p.jsonl"), str(tmp_path / "p.npz")]) == 0
    assert load_trace(tmp_path / "p.npz").num_tokens == 100
    assert main(["trace", "convert", str(tmp_path / "p.jsonl"), str(tmp_path / "k.npz"), "--keep-padding"]) == 0
    assert load_trace(tmp_path / "k.npz").num_tokens == 1100


def test_short_genuine_repeats_survive():
    e = np.zeros((200, 2, 1), dtype=np.int16)
    e[::2] = 1  # alternating: no runs
    e[10:10 + PADDING_MIN_RUN - 1] = 3  # 63 identical rows: below the threshold
    _, n = detect_padding(e)
    assert n == 0
    e[10:10 + PADDING_MIN_RUN] = 3
    assert detect_padding(e)[1] == PADDING_MIN_RUN
    # an all-padding trace is an input error, not an empty trace
    with pytest.raises(InputError):
        drop_padding(Trace(experts=np.zeros((100, 2, 1), dtype=np.int16)))


MALFORMED = [
    ("", None),
    ("[1, 2]\n", None),
    ("{not json\n", None),
    ('{"request": 1}\n', "experts"),
    ('{"experts": [[1], 2, "x"]}\n', "experts[2]"),
    ('{"experts": [[1]]}\n{"experts": [[1], [2]]}\n', "experts"),
    ('{"experts": [[1]], "step": 0}\n{"experts": [[1]]}\n', "step"),
    ('{"experts": [[1]], "phase": 3}\n', "phase"),
    ('{"experts": [[1]], "weights": [[0.1, 0.2]]}\n', "weights[0]"),
    ('{"experts": [[1, 1]]}\n', "experts"),
    ('{"experts": [[1]], "step": 5}\n{"experts": [[2]], "step": 4}\n', "step"),
]


@pytest.mark.parametrize("text, field", MALFORMED)
def test_malformed_jsonl_is_one_input_error(tmp_path, text, field):
    p = tmp_path / "bad.jsonl"
    p.write_text(text)
    with pytest.raises(InputError) as ei:
        from_jsonl(p)
    assert str(p) in str(ei.value) and "\n" not in str(ei.value)
    if field:
        assert ei.value.field == field


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20,
)
_keys = st.sampled_from(["experts", "weights", "request", "token", "step", "phase", "moesim_trace", "x"])
_row = st.dictionaries(_keys, _json, max_size=6)
_line = st.one_of(_row.map(json.dumps), _json.map(json.dumps), st.text(max_size=30))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_line, min_size=0, max_size=4))
def test_fuzzed_jsonl_gives_trace_or_input_error(tmp_path, lines):
    p = tmp_path / "fuzz.jsonl"
    p.write_text("\n".join(lines), encoding="utf-8")
    for reader in (from_jsonl, from_layer_lists):
        try:
            tr = reader(p)
        except InputError as exc:
            assert "\n" not in str(exc)
        else:
            assert tr.experts.ndim == 3


def test_cli_conversions(tmp_path, capsys):
    npz = ROOT / "traces" / "switch-base-8.npz"
    ref = load_trace(npz)
    steps = [
        (str(npz), "a.jsonl", []),
        ("a.jsonl", "b.parquet", []),
        ("b.parquet", "c.npz", []),
        ("c.npz", "d", []),
        ("d", "e.out", ["--to", "jsonl", "--model", "google/switch-base-8"]),
        ("e.out", "f.npz", ["--from", "jsonl"]),
    ]
    for s, d, extra in steps:
        s = s if s.startswith("/") else str(tmp_path / s)
        assert main(["trace", "convert", s, str(tmp_path / d), *extra]) == 0, capsys.readouterr().err
    same_arrays(ref, load_trace(tmp_path / "f.npz"))
    same_arrays(ref, load_trace(tmp_path / "d"))
    assert "dropped 0 padding rows" in capsys.readouterr().out
    if SWITCH_JSON.exists():
        assert main(["trace", "convert", str(SWITCH_JSON), str(tmp_path / "rt.jsonl")]) == 0
        np.testing.assert_array_equal(from_jsonl(tmp_path / "rt.jsonl").experts, ref.experts)
    ll = tmp_path / "ll.json"
    ll.write_text(json.dumps({"0": [[3, 5], [1, 2]], "1": [[1, 0], [4, 2]]}))
    assert main(["trace", "convert", str(ll), str(tmp_path / "ll.npz"), "--model", "toy"]) == 0
    assert load_trace(tmp_path / "ll.npz").meta["model"] == "toy"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["nothing.jsonl", "x.npz"], "not found"),
        (["bad.jsonl", "x.npz"], "bad.jsonl:1"),
        (["ok.jsonl", "x.npz", "--from", "csv"], "--from"),
        (["ok.jsonl", "x.npz", "--to", "dir"], "DST"),
        (["ok.weird", "x.npz"], "--from"),
    ],
)
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"experts": "nope"}\n')
    (tmp_path / "ok.jsonl").write_text('{"experts": [[1]]}\n')
    (tmp_path / "ok.weird").write_text('{"experts": [[1]]}\n')
    assert main(["trace", "convert", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and err.count("\n") == 0, err
