"""Trace files: save/load round trips, content hashes, validation errors, model checks."""

from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest

from moesim.errors import InputError
from moesim.traces import (
    Trace,
    check_trace_against_model,
    load_trace,
    save_trace,
    trace_sha256,
    validate_trace,
)


def full_trace(T=12, L=3, K=2, E=6, seed=0) -> Trace:
    """A small trace with every optional array filled."""
    rng = np.random.default_rng(seed)
    experts = np.stack([[rng.permutation(E)[:K] for _ in range(L)] for _ in range(T)]).astype(np.int16)
    experts[3, 1, 1] = -1
    w = rng.random((T, L, K)).astype(np.float32)
    probs = rng.random((T, L, E)).astype(np.float16)
    return Trace(
        experts=experts,
        weights=w,
        probs=probs,
        request=(np.arange(T) // 4).astype(np.int32),
        token=(np.arange(T) % 4).astype(np.int32),
        step=np.arange(T, dtype=np.int32),
        phase=(np.arange(T) % 4 > 0).astype(np.int8),
        meta={
            "format_version": 1,
            "model": "tiny",
            "num_experts": E,
            "top_k": K,
            "layers": [1, 3, 5][:L],
            "source": "unit test",
            "licence": "CC0-1.0",
            "captured_with": {"tool": "numpy"},
        },
    )


def assert_same(a: Trace, b: Trace):
    for name in ("experts", "weights", "probs", "request", "token", "step", "phase"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape, name
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a.meta == b.meta


@pytest.mark.parametrize("name", ["t.npz", "tdir"])
def test_round_trip(tmp_path, name):
    tr = full_trace()
    path = tmp_path / name
    save_trace(tr, path)
    back = load_trace(path)
    assert_same(tr, back)
    assert back.sha256 == trace_sha256(path)
    assert back.num_tokens == 12 and back.num_layers == 3 and back.top_k == 2 and back.num_experts == 6
    assert back.layers == (1, 3, 5)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary leftovers
    if name == "tdir":
        assert isinstance(back.experts, np.memmap)  # large traces are memory-mapped
        assert sorted(p.name for p in path.iterdir())[-1] == "weights.npy"


@pytest.mark.parametrize("name", ["t.npz", "tdir"])
def test_sha256_stable_and_sensitive(tmp_path, name):
    tr = full_trace()
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    save_trace(tr, a / name)
    save_trace(tr, b / name)
    h = load_trace(a / name).sha256
    assert h == load_trace(b / name).sha256  # same trace, same bytes, same hash
    save_trace(tr, a / name)  # overwriting gives the same bytes again
    assert load_trace(a / name).sha256 == h
    tr.experts[0, 0, 0] = (tr.experts[0, 0, 0] + 1) % 6 if tr.experts[0, 0, 1] != (tr.experts[0, 0, 0] + 1) % 6 else (tr.experts[0, 0, 0] + 2) % 6
    save_trace(tr, b / name)
    assert load_trace(b / name).sha256 != h


def test_npz_sha256_is_file_bytes(tmp_path):
    p = tmp_path / "t.npz"
    save_trace(full_trace(), p)
    assert load_trace(p).sha256 == hashlib.sha256(p.read_bytes()).hexdigest()


def test_directory_sha256_rule(tmp_path):
    p = tmp_path / "d"
    save_trace(full_trace(), p)
    h = hashlib.sha256()
    for f in sorted(p.iterdir()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    assert load_trace(p).sha256 == h.hexdigest()


def test_minimal_trace_and_num_experts_from_data(tmp_path):
    tr = Trace(experts=np.array([[[2]], [[0]]], dtype=np.int32))
    save_trace(tr, tmp_path / "m.npz")
    back = load_trace(tmp_path / "m.npz")
    assert back.num_experts == 3 and back.layers is None and back.weights is None
    assert back.meta == {"format_version": 1}
    assert Trace(experts=tr.experts).sha256 is None


def test_save_refuses_foreign_directory_and_invalid_trace(tmp_path):
    d = tmp_path / "notes"
    d.mkdir()
    (d / "README.md").write_text("mine")
    with pytest.raises(InputError, match="not part of a trace"):
        save_trace(full_trace(), d)
    assert (d / "README.md").exists()
    bad = full_trace()
    bad.experts[0, 0, :] = 1
    with pytest.raises(InputError) as ei:
        save_trace(bad, tmp_path / "bad.npz")
    assert ei.value.field == "experts" and not (tmp_path / "bad.npz").exists()


def test_save_replaces_trace_directory(tmp_path):
    d = tmp_path / "d"
    save_trace(full_trace(), d)
    small = Trace(experts=np.zeros((2, 1, 1), np.int16))
    save_trace(small, d)
    assert sorted(p.name for p in d.iterdir()) == ["experts.npy", "meta.json"]
    assert load_trace(d).num_tokens == 2


# ---------------------------------------------------------------------------------------------
# validation errors: each case names its field


def _mod(fn):
    tr = full_trace()
    fn(tr)
    return tr


def _set(name, value):
    return lambda tr: setattr(tr, name, value)


def _meta(key, value):
    return lambda tr: tr.meta.__setitem__(key, value)


T, L, K, E = 12, 3, 2, 6
BAD = {
    "experts missing": (_set("experts", None), "experts", "missing"),
    "experts 2-D": (_set("experts", np.zeros((T, L), np.int16)), "experts", "3-D"),
    "experts float": (_set("experts", np.zeros((T, L, K), np.float32)), "experts", "integer"),
    "experts uint64": (_set("experts", np.zeros((T, L, K), np.uint64)), "experts", "integer"),
    "experts empty": (_set("experts", np.zeros((0, L, K), np.int16)), "experts", "empty"),
    "id below -1": (lambda tr: tr.experts.__setitem__((2, 0, 0), -3), "experts", "-3"),
    "id too large": (lambda tr: tr.experts.__setitem__((2, 0, 0), E), "experts", "num_experts"),
    "duplicate": (lambda tr: tr.experts.__setitem__((5, 2), [4, 4]), "experts", "twice"),
    "weights shape": (_set("weights", np.zeros((T, L, K + 1), np.float32)), "weights", "[T, L, K]"),
    "weights int": (_set("weights", np.zeros((T, L, K), np.int32)), "weights", "float"),
    "weights nan": (lambda tr: tr.weights.__setitem__((0, 0, 0), np.nan), "weights", "non-finite"),
    "probs E": (_set("probs", np.zeros((T, L, E + 1), np.float16)), "probs", str(E)),
    "probs T": (_set("probs", np.zeros((T - 1, L, E), np.float16)), "probs", "shape"),
    "probs negative": (lambda tr: tr.probs.__setitem__((0, 0, 0), -1), "probs", "non-negative"),
    "request 2-D": (_set("request", np.zeros((T, 1), np.int32)), "request", "[T]"),
    "token length": (_set("token", np.zeros(T + 1, np.int32)), "token", "[T]"),
    "token float": (_set("token", np.zeros(T, np.float32)), "token", "int32"),
    "request negative": (lambda tr: tr.request.__setitem__(1, -1), "request", ">= 0"),
    "step decreasing": (lambda tr: tr.step.__setitem__(5, 0), "step", "decreases"),
    "phase value": (lambda tr: tr.phase.__setitem__(0, 2), "phase", "prefill"),
    "meta not dict": (_set("meta", ["x"]), "meta", "object"),
    "format too new": (_meta("format_version", 99), "meta.format_version", "newer"),
    "format bool": (_meta("format_version", True), "meta.format_version", "integer"),
    "model int": (_meta("model", 3), "meta.model", "string"),
    "licence list": (_meta("licence", ["MIT"]), "meta.licence", "string"),
    "captured_with num": (_meta("captured_with", 1.5), "meta.captured_with", "string"),
    "num_experts zero": (_meta("num_experts", 0), "meta.num_experts", "positive"),
    "num_experts str": (_meta("num_experts", "8"), "meta.num_experts", "positive"),
    "top_k above K": (_meta("top_k", 3), "meta.top_k", "1 to 2"),
    "layers length": (_meta("layers", [1, 3]), "meta.layers", "3 layer columns"),
    "layers order": (_meta("layers", [1, 5, 3]), "meta.layers", "strictly increasing"),
    "layers repeat": (_meta("layers", [1, 1, 3]), "meta.layers", "strictly increasing"),
    "layers negative": (_meta("layers", [-1, 1, 3]), "meta.layers", "non-negative"),
    "layers floats": (_meta("layers", [1.0, 3.0, 5.0]), "meta.layers", "integers"),
    "layers not list": (_meta("layers", "1,3,5"), "meta.layers", "integers"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_validation_errors_name_the_field(case):
    fn, field, needle = BAD[case]
    tr = _mod(fn)
    with pytest.raises(InputError) as ei:
        validate_trace(tr, "some/trace.npz")
    err = ei.value
    assert err.field == field, (case, err.line())
    assert err.source == "some/trace.npz"
    assert needle in err.message, (case, err.line())
    assert "\n" not in err.line()


@pytest.mark.parametrize("case", ["duplicate", "layers order", "probs E", "phase value"])
def test_validation_errors_from_files(tmp_path, case):
    fn, field, _ = BAD[case]
    tr = _mod(fn)
    arrays = tr.arrays()
    p = tmp_path / "raw.npz"
    np.savez(p, meta=np.array(json.dumps(tr.meta)), **arrays)
    with pytest.raises(InputError) as ei:
        load_trace(p)
    assert ei.value.field == field and ei.value.source == str(p)


def test_valid_edge_cases():
    tr = full_trace()
    tr.experts[7, 0, :] = -1  # a dropped token: -1 may repeat
    tr.weights[7, 0, :] = np.nan  # weights of empty slots are not looked at
    validate_trace(tr, "x")
    tr.experts = tr.experts.astype(np.int32)
    tr.meta = {}
    validate_trace(tr, "x")


# ---------------------------------------------------------------------------------------------
# load errors


def _load_error(p, field=None, needle=""):
    with pytest.raises(InputError) as ei:
        load_trace(p)
    err = ei.value
    assert str(p) in err.line(), err.line()
    if field:
        assert err.field == field, err.line()
    assert needle in err.message, err.line()
    return err


def test_load_errors(tmp_path):
    _load_error(tmp_path / "absent.npz", needle="not found")
    j = tmp_path / "r.json"
    j.write_text("{}")
    _load_error(j, needle="moesim trace convert")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 definitely not a zip")
    _load_error(junk, needle="not a readable .npz")
    single = tmp_path / "single.npz"
    with open(single, "wb") as fh:
        np.save(fh, np.zeros((2, 1, 1), np.int16))
    _load_error(single, needle="single array")
    pick = tmp_path / "pickle.npz"
    pick.write_bytes(pickle.dumps({"experts": [1, 2]}))
    _load_error(pick)
    obj = tmp_path / "obj.npz"
    np.savez(obj, experts=np.array([[[1]], [[None]]], dtype=object))
    _load_error(obj, "experts", "pickled")
    unknown = tmp_path / "unknown.npz"
    np.savez(unknown, experts=np.zeros((2, 1, 1), np.int16), expert=np.zeros(2))
    _load_error(unknown, "expert", "unknown array")
    none = tmp_path / "none.npz"
    np.savez(none, weights=np.zeros((2, 1, 1), np.float32))
    _load_error(none, "experts", "missing")
    for meta, needle in (
        (np.array("{not json"), "JSON"),
        (np.array("[1, 2]"), "object"),
        (np.array('{"num_experts": NaN}'), "JSON"),
        (np.array(["{}"]), "0-d"),
        (np.array(b"{}"), "0-d"),
    ):
        m = tmp_path / "meta.npz"
        np.savez(m, experts=np.zeros((2, 1, 1), np.int16), meta=meta)
        _load_error(m, "meta", needle)


def test_directory_load_errors(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    _load_error(d, "experts", "experts.npy")
    np.save(d / "experts.npy", np.zeros((2, 1, 1), np.int16))
    np.save(d / "bogus.npy", np.zeros(2))
    _load_error(d, "bogus", "unknown file")
    (d / "bogus.npy").unlink()
    np.save(d / "weights.npy", np.array([[[None]], [[1]]], dtype=object), allow_pickle=True)
    _load_error(d, "weights", "pickled")
    raw = np.lib.format
    with open(d / "weights.npy", "wb") as fh:
        raw.write_array(fh, np.zeros((2, 1, 1), np.float32))
    (d / "weights.npy").write_bytes((d / "weights.npy").read_bytes()[:-3])  # truncated
    _load_error(d, "weights", "cannot be read")
    (d / "weights.npy").unlink()
    (d / "meta.json").write_text('{"layers": [4, 2]}')
    _load_error(d, "meta.layers")
    (d / "meta.json").write_bytes(b"\xff\xfe")
    _load_error(d, "meta")
    (d / "meta.json").write_text('{"layers": [4]}')
    assert load_trace(d).layers == (4,)


# ---------------------------------------------------------------------------------------------
# trace vs model


def test_check_against_model_column_mapping():
    tr = full_trace()  # meta layers 1, 3, 5; experts < 6
    tr.probs = None
    assert check_trace_against_model(tr, num_experts=8, moe_layers=range(12), source="t") == (1, 3, 5)
    assert check_trace_against_model(tr, num_experts=6, moe_layers=[0, 2, 4, 6], layers=[0, 2, 6], source="t") == (0, 2, 6)
    tr.meta.pop("layers")
    assert check_trace_against_model(tr, num_experts=6, moe_layers=(4, 5, 6), source="t") == (4, 5, 6)


@pytest.mark.parametrize(
    "kwargs, field, needle",
    [
        (dict(num_experts=8, moe_layers=range(0, 12, 2)), "meta.layers", "not an MoE layer"),
        (dict(num_experts=8, moe_layers=range(12), layers=[1, 3]), "trace.layers", "2 layers"),
        (dict(num_experts=8, moe_layers=range(12), layers=[5, 3, 1]), "trace.layers", "increasing"),
        (dict(num_experts=8, moe_layers=range(12), layers=[1.5, 3, 5]), "trace.layers", "integer"),
        (dict(num_experts=4, moe_layers=range(12)), "experts", "4 experts"),
    ],
)
def test_check_against_model_errors(kwargs, field, needle):
    tr = full_trace()
    with pytest.raises(InputError) as ei:
        check_trace_against_model(tr, source="some.npz", **kwargs)
    assert ei.value.field == field and needle in ei.value.message and ei.value.source == "some.npz"


def test_check_against_model_unmapped_columns():
    tr = full_trace()
    tr.meta.pop("layers")
    with pytest.raises(InputError) as ei:
        check_trace_against_model(tr, num_experts=8, moe_layers=range(4), source="s.npz")
    assert "trace.layers" in ei.value.message and ei.value.field == "experts"
    with pytest.raises(InputError) as ei:
        check_trace_against_model(full_trace(), num_experts=7, moe_layers=range(12), source="s")
    assert ei.value.field == "probs"  # router distribution over 6 experts, model has 7
