"""Property tests: whatever bytes or arrays a trace file holds, load_trace either returns a trace
that passes validation or raises InputError — never another exception."""

from __future__ import annotations

import io
import json
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.errors import InputError
from moesim.traces import ARRAY_NAMES, load_trace, save_trace, validate_trace

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32",
          "float64", "bool", "complex64", "U3", "S2", "object", "datetime64[s]"]


def _load_or_input_error(path):
    try:
        tr = load_trace(path)
    except InputError as exc:
        assert exc.source and str(path) in exc.line()
        assert "\n" not in exc.line()
        return None
    validate_trace(tr, str(path))  # what comes back is a valid trace
    return tr


@SETTINGS
@given(data=st.binary(max_size=600), prefix=st.sampled_from([b"", b"PK\x03\x04", b"\x93NUMPY", b"\x80\x04"]))
def test_random_bytes(data, prefix):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "t.npz"
        p.write_bytes(prefix + data)
        _load_or_input_error(p)


@st.composite
def array(draw, name):
    dtype = draw(st.sampled_from(DTYPES))
    ndim = draw(st.sampled_from([0, 1, 3, 3, 3, 2]))
    shape = tuple(draw(st.integers(0, 4)) for _ in range(ndim))
    n = int(np.prod(shape)) if shape else 1
    if dtype == "object":
        return np.array([None] * n, dtype=object).reshape(shape)
    raw = draw(st.lists(st.integers(-3, 9), min_size=n, max_size=n))
    if dtype.startswith(("U", "S")):
        return np.array([str(x) for x in raw], dtype=dtype).reshape(shape)
    if dtype.startswith("datetime"):
        return np.array(raw, dtype="int64").astype(dtype).reshape(shape)
    with np.errstate(all="ignore"):
        return np.array(raw, dtype="int64").astype(dtype).reshape(shape)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 40) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)
META_KEYS = ["format_version", "model", "num_experts", "top_k", "layers", "source", "licence", "captured_with"]


@st.composite
def meta_text(draw):
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.text(max_size=40))  # anything, mostly not JSON
    if kind == 1:
        return json.dumps(draw(JSONISH))
    d = draw(st.dictionaries(st.sampled_from(META_KEYS), JSONISH | st.lists(st.integers(-1, 6), max_size=5), max_size=6))
    return json.dumps(d)


@SETTINGS
@given(data=st.data())
def test_random_arrays_in_npz(data):
    names = data.draw(st.sets(st.sampled_from(list(ARRAY_NAMES) + ["bogus"]), max_size=4))
    if data.draw(st.booleans()):
        names = set(names) | {"experts"}
    arrays = {n: data.draw(array(n)) for n in sorted(names)}
    if data.draw(st.booleans()):
        arrays["meta"] = np.array(data.draw(meta_text()))
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "t.npz"
        if data.draw(st.booleans()):
            np.savez(p, **arrays)
        else:
            np.savez_compressed(p, **arrays)
        tr = _load_or_input_error(p)
        if tr is not None:  # a valid trace survives a save/load round trip
            save_trace(tr, Path(d) / "again.npz")
            assert load_trace(Path(d) / "again.npz").experts.tolist() == tr.experts.tolist()


@SETTINGS
@given(data=st.data())
def test_valid_shaped_arrays_with_random_values(data):
    # near-valid traces: right shapes, random values and meta, so validation itself is exercised
    T, L, K = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    dtype = data.draw(st.sampled_from(["int16", "int32", "int8", "uint8", "int64"]))
    vals = data.draw(st.lists(st.integers(-2, 7), min_size=T * L * K, max_size=T * L * K))
    with np.errstate(all="ignore"):
        experts = np.array(vals).astype(dtype).reshape(T, L, K)
    arrays = {"experts": experts}
    if data.draw(st.booleans()):
        arrays["weights"] = np.array(data.draw(st.lists(st.floats(width=32), min_size=T * L * K, max_size=T * L * K)), np.float32).reshape(T, L, K)
    for n in ("request", "token", "step", "phase"):
        if data.draw(st.booleans()):
            arrays[n] = np.array(data.draw(st.lists(st.integers(-1, 2), min_size=T, max_size=T)), np.int32)
    arrays["meta"] = np.array(data.draw(meta_text()))
    with tempfile.TemporaryDirectory() as d:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        p = Path(d) / "t.npz"
        p.write_bytes(buf.getvalue())
        _load_or_input_error(p)
        # the same arrays as a directory trace
        q = Path(d) / "tdir"
        q.mkdir()
        for n, a in arrays.items():
            if n == "meta":
                (q / "meta.json").write_text(str(a[()]))
            else:
                np.save(q / f"{n}.npy", a)
        _load_or_input_error(q)


@SETTINGS
@given(data=st.binary(min_size=1, max_size=300), member=st.sampled_from(["experts.npy", "experts", "meta.npy", "x/y.npy"]))
def test_zip_with_random_members(data, member):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "t.npz"
        with zipfile.ZipFile(p, "w") as zf:
            zf.writestr(member, data)
        _load_or_input_error(p)
