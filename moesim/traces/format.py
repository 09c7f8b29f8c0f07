"""The trace format (DESIGN 3.3): the in-memory :class:`Trace`, reading, writing and checking.

A trace on disk is either one ``.npz`` archive (small traces, interchange) or a directory of
``.npy`` files plus ``meta.json`` (large traces, memory-mapped on load). Every problem with a trace
file is reported as one :class:`~moesim.errors.InputError` that names the file, the array or meta
key, and what was expected.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import shutil
import tempfile
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moesim.errors import InputError

#: Version of the on-disk layout written by :func:`save_trace`.
FORMAT_VERSION = 1

#: Array names a trace may hold, in the order they are written.
ARRAY_NAMES = ("experts", "weights", "probs", "request", "token", "step", "phase", "spec_next")

#: Meta keys with a defined meaning (others are kept as they are).
META_KEYS = (
    "format_version",
    "model",
    "num_experts",
    "top_k",
    "layers",
    "source",
    "licence",
    "captured_with",
)

_EXPECTED_FILES = "a .npz file, or a directory of .npy files with meta.json"
# rows per chunk when scanning big (possibly memory-mapped) arrays: about 4M entries at a time
_CHUNK_ENTRIES = 1 << 22
# a fixed zip timestamp, so that saving the same trace twice gives the same bytes (and sha256)
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


@dataclass(eq=False)
class Trace:
    """A routing trace: which experts each token-step chose at each MoE layer.

    ``experts`` is an integer array ``[T, L, K]`` (token-steps x MoE-layer columns x rank; rank 0 is
    the highest gate; ``-1`` = no expert). The optional arrays follow DESIGN 3.3: ``weights``
    ``[T, L, K]`` gate weights, ``probs`` ``[T, L, E]`` full router distribution, and per row
    ``request`` / ``token`` (position within the request) / ``step`` (engine step) / ``phase``
    (0 = prefill, 1 = decode); ``spec_next`` ``[T, L, K]`` the experts the *next* MoE layer's gate
    picks on this layer's output hidden state (Mixtral-offloading's speculative guess, recorded by
    ``moesim trace capture --spec-next``; ``-1`` in the last column). ``meta`` holds the JSON metadata; ``sha256`` is the hex digest of
    the bytes the trace was loaded from (``None`` for a trace built in memory).
    """

    experts: np.ndarray
    weights: np.ndarray | None = None
    probs: np.ndarray | None = None
    request: np.ndarray | None = None
    token: np.ndarray | None = None
    step: np.ndarray | None = None
    phase: np.ndarray | None = None
    spec_next: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    sha256: str | None = None

    @property
    def num_tokens(self) -> int:
        """Rows (token-steps), ``T``."""
        return int(self.experts.shape[0])

    @property
    def num_layers(self) -> int:
        """MoE-layer columns, ``L``."""
        return int(self.experts.shape[1])

    @property
    def top_k(self) -> int:
        """Expert slots per (token, layer), ``K`` (the largest top-k when it is dynamic)."""
        return int(self.experts.shape[2])

    @property
    def num_experts(self) -> int:
        """Experts per MoE layer: ``meta['num_experts']`` when given, else the largest id + 1."""
        n = (self.meta or {}).get("num_experts")
        if _is_int(n):
            return int(n)
        if self.experts.size == 0:
            return 0
        return int(np.max(self.experts)) + 1

    @property
    def layers(self) -> tuple[int, ...] | None:
        """Model layer index of each column (``meta['layers']``), or ``None`` when not recorded."""
        ls = (self.meta or {}).get("layers")
        if isinstance(ls, (list, tuple)):
            return tuple(int(x) for x in ls)
        return None

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays present, by name, in :data:`ARRAY_NAMES` order."""
        return {n: getattr(self, n) for n in ARRAY_NAMES if getattr(self, n) is not None}

    def __repr__(self) -> str:
        e = self.experts
        shape = getattr(e, "shape", None)
        extra = [n for n in ARRAY_NAMES[1:] if getattr(self, n) is not None]
        return (
            f"Trace(experts={shape}, arrays={extra}, model={(self.meta or {}).get('model')!r}, "
            f"sha256={(self.sha256 or '')[:12] or None})"
        )


# ----------------------------------------------------------------------------------------------
# hashing


def trace_sha256(path: str | os.PathLike) -> str:
    """sha256 hex of a trace file's bytes; for a directory, over its files' sorted names and bytes.

    For a directory: each regular file in name order, its name, then its bytes. This is the trace
    digest that :func:`moesim.config.loader.scenario_hash` combines with the scenario.
    """
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.is_file():
                h.update(f.name.encode())
                _hash_file(h, f)
    else:
        _hash_file(h, p)
    return h.hexdigest()


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)


# ----------------------------------------------------------------------------------------------
# loading


def load_trace(path: str | os.PathLike) -> Trace:
    """Read and validate a trace (``.npz`` file or directory of ``.npy`` + ``meta.json``).

    Directory arrays are memory-mapped read-only. Raises :class:`InputError` for a missing,
    unreadable, corrupt or invalid trace (pickled object arrays included).
    """
    p = Path(path)
    src = str(path)
    try:
        exists = p.exists()
        is_dir = p.is_dir()
    except OSError as exc:  # e.g. a name too long for the file system
        raise InputError(f"cannot be opened ({_why(exc)})", source=src) from None
    if not exists:
        raise InputError(f"trace not found (expected {_EXPECTED_FILES})", source=src)
    try:
        if is_dir:
            arrays, meta = _read_dir(p, src)
        else:
            arrays, meta = _read_npz(p, src)
        digest = trace_sha256(p)
    except OSError as exc:
        raise InputError(f"cannot be read ({_why(exc)})", source=src) from None
    trace = Trace(**arrays, meta=meta, sha256=digest)
    validate_trace(trace, src)
    return trace


def _read_npz(p: Path, src: str) -> tuple[dict, dict]:
    if p.suffix.lower() == ".json":
        raise InputError(
            f"is JSON, not a trace (expected {_EXPECTED_FILES}); convert a RouterTrace JSON with "
            "`moesim trace convert`",
            source=src,
        )
    try:
        obj = np.load(p, allow_pickle=False)
    except Exception as exc:  # corrupt archives raise many types (BadZipFile, EOFError, ...)
        raise InputError(f"not a readable .npz trace ({_why(exc)})", source=src) from None
    if not isinstance(obj, np.lib.npyio.NpzFile):
        raise InputError(
            f"holds a single array, not a .npz archive of named arrays (expected {_EXPECTED_FILES})",
            source=src,
        )
    raw: dict = {}
    with obj:
        names = list(obj.files)
        _check_names(names, src, kind="array")
        for name in names:
            try:
                a = obj[name]
            except Exception as exc:
                raise InputError(_unreadable(exc), source=src, field=name) from None
            if not isinstance(a, np.ndarray):
                raise InputError("is not a .npy array", source=src, field=name)
            raw[name] = a
    meta = _meta_from_array(raw.pop("meta", None), src)
    return raw, meta


def _read_dir(p: Path, src: str) -> tuple[dict, dict]:
    files = {}
    for f in sorted(p.iterdir()):
        if f.suffix == ".npy" and f.is_file():
            files[f.stem] = f
    _check_names(list(files), src, kind="file", allow_meta=False)
    raw = {}
    for name, f in files.items():
        fsrc = str(f)
        try:
            with np.errstate(all="ignore"):  # absurd header shapes overflow numpy's size product
                a = np.load(f, mmap_mode="r", allow_pickle=False)
        except ValueError:
            # empty arrays cannot be memory-mapped; a plain read tells them from corrupt files
            try:
                a = np.load(f, allow_pickle=False)
            except Exception as exc2:
                raise InputError(_unreadable(exc2), source=fsrc, field=name) from None
        except Exception as exc:
            raise InputError(_unreadable(exc), source=fsrc, field=name) from None
        if not isinstance(a, np.ndarray):
            raise InputError("is not a .npy array", source=fsrc, field=name)
        raw[name] = a
    meta_path = p / "meta.json"
    meta: dict = {}
    if meta_path.is_file():
        try:
            text = meta_path.read_text(encoding="utf-8")
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot be read ({_why(exc)})", source=str(meta_path), field="meta") from None
        meta = _parse_meta_text(text, str(meta_path))
    return raw, meta


def _check_names(names: list, src: str, *, kind: str, allow_meta: bool = True) -> None:
    allowed = ARRAY_NAMES + (("meta",) if allow_meta else ())
    for n in names:
        if n not in allowed:
            what = f"{n}.npy" if kind == "file" else repr(n)
            raise InputError(
                f"unknown {kind} {what}; a trace holds only {', '.join(allowed)}",
                source=src,
                field=n,
            )
    if "experts" not in names:
        raise InputError(
            "missing: every trace needs an integer array experts [tokens, layers, top_k]"
            + (" (experts.npy)" if kind == "file" else ""),
            source=src,
            field="experts",
        )


def _unreadable(exc: Exception) -> str:
    if "allow_pickle" in str(exc):
        return "holds pickled Python objects; traces hold plain numeric arrays only"
    return f"cannot be read ({_why(exc)})"


def _meta_from_array(a, src: str) -> dict:
    if a is None:
        return {}
    if a.ndim != 0 or a.dtype.kind != "U":
        raise InputError(
            f"expected a 0-d unicode string array holding JSON, got dtype {a.dtype} shape {a.shape}",
            source=src,
            field="meta",
        )
    return _parse_meta_text(str(a[()]), src)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed in trace meta")


def _parse_meta_text(text: str, src: str) -> dict:
    try:
        meta = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise InputError(f"is not valid JSON ({_why(exc)})", source=src, field="meta") from None
    if not isinstance(meta, dict):
        raise InputError(
            f"expected a JSON object, got {type(meta).__name__}", source=src, field="meta"
        )
    return meta


def _why(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    if len(msg) > 120:
        msg = msg[:117] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


# ----------------------------------------------------------------------------------------------
# saving


def save_trace(trace: Trace, path: str | os.PathLike) -> Path:
    """Validate ``trace`` and write it atomically: ``.npz`` when the name ends in ``.npz``, else a
    directory of ``.npy`` files plus ``meta.json``. Returns the path written.

    The data goes to a temporary name beside the target and is renamed into place, so a failed
    write never leaves a complete-looking trace. The same trace always gives the same bytes.
    An existing target is replaced; a directory is replaced only when it holds nothing but trace
    files.
    """
    p = Path(path)
    dst = str(path)
    validate_trace(trace, dst)
    meta = dict(trace.meta or {})
    meta.setdefault("format_version", FORMAT_VERSION)
    try:
        meta_text = json.dumps(meta, sort_keys=True, default=_json_default, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"cannot be written as JSON ({_why(exc)})", source=dst, field="meta") from None
    arrays = trace.arrays()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix.lower() == ".npz":
            _write_npz(p, arrays, meta_text)
        else:
            _write_dir(p, arrays, meta_text, dst)
    except OSError as exc:
        raise InputError(f"cannot be written ({_why(exc)})", source=dst) from None
    return p


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _write_npz(p: Path, arrays: dict, meta_text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                items = list(arrays.items()) + [("meta", np.array(meta_text))]
                for name, arr in items:
                    info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
                    info.compress_type = zipfile.ZIP_DEFLATED
                    info.external_attr = 0o644 << 16
                    with zf.open(info, "w", force_zip64=True) as out:
                        np.lib.format.write_array(out, np.asarray(arr), allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_dir(p: Path, arrays: dict, meta_text: str, dst: str) -> None:
    if p.exists() and not p.is_dir():
        raise InputError("exists and is not a directory (a trace directory was asked for)", source=dst)
    if p.is_dir():
        strays = [f.name for f in p.iterdir() if not (f.suffix == ".npy" or f.name == "meta.json")]
        if strays:
            raise InputError(
                f"exists and holds files that are not part of a trace ({strays[0]}); refusing to "
                "replace it",
                source=dst,
            )
    tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent))
    try:
        for name, arr in arrays.items():
            with open(tmp / f"{name}.npy", "wb") as out:
                np.lib.format.write_array(out, np.asarray(arr), allow_pickle=False)
        (tmp / "meta.json").write_text(meta_text + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        if p.exists():
            old = p.with_name(f".{p.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(p, old)
            os.replace(tmp, p)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, p)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# validation


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _chunks(n_rows: int, row_entries: int):
    step = max(1, _CHUNK_ENTRIES // max(1, row_entries))
    for a in range(0, n_rows, step):
        yield a, min(n_rows, a + step)


def _where(idx) -> str:
    idx = tuple(int(i) for i in idx)
    names = ("row", "column", "rank")
    return ", ".join(f"{n} {i}" for n, i in zip(names, idx))


def validate_trace(trace: Trace, source: str | None = None) -> None:
    """Check a trace against DESIGN 3.3; raise :class:`InputError` naming ``source`` and the array.

    Checks: ``experts`` present, a non-empty 3-D signed-integer array with ids in
    ``[-1, num_experts)`` and no expert twice in one (token, layer) row (``-1`` may repeat);
    optional arrays with shapes and dtypes matching ``T``, ``L``, ``K``, ``E``; meta types
    (``layers`` a strictly increasing list of ``L`` non-negative ints).
    """
    src = source
    e = trace.experts
    if e is None:
        raise InputError(
            "missing: every trace needs an integer array experts [tokens, layers, top_k]",
            source=src,
            field="experts",
        )
    if not isinstance(e, np.ndarray) or e.ndim != 3 or not _int_dtype(e.dtype):
        got = (
            f"dtype {e.dtype} shape {e.shape}"
            if isinstance(e, np.ndarray)
            else type(e).__name__
        )
        raise InputError(
            f"expected a 3-D integer array [tokens, layers, top_k] (int16 or int32), got {got}",
            source=src,
            field="experts",
        )
    T, L, K = (int(x) for x in e.shape)
    if min(T, L, K) == 0:
        raise InputError(
            f"is empty (shape {e.shape}); expected at least one token, layer and rank",
            source=src,
            field="experts",
        )
    meta = _check_meta(trace.meta, L, K, src)
    E = meta.get("num_experts")
    hi = _check_expert_values(e, E, src)

    w = trace.weights
    if w is not None:
        _need_array(w, "weights", src, kinds="f", shape=(T, L, K), what="float16/float32 [T, L, K]")
        for a, b in _chunks(T, L * K):
            wc = np.asarray(w[a:b])
            bad = ~np.isfinite(wc) & (np.asarray(e[a:b]) != -1)
            if bad.any():
                pos = np.argwhere(bad)[0] + (a, 0, 0)
                raise InputError(
                    f"non-finite gate weight at {_where(pos)}; expected finite numbers",
                    source=src,
                    field="weights",
                )
    pr = trace.probs
    if pr is not None:
        _need_array(pr, "probs", src, kinds="f", ndim=3, what="float16 [T, L, E]")
        if pr.shape[:2] != (T, L):
            raise InputError(
                f"shape {pr.shape} does not match experts {e.shape}; expected [{T}, {L}, E]",
                source=src,
                field="probs",
            )
        n_e = pr.shape[2]
        if (E is not None and n_e != E) or n_e <= hi:
            want = E if E is not None else f"more than the largest expert id {hi}"
            raise InputError(
                f"has {n_e} experts in its last dimension; expected {want}", source=src, field="probs"
            )
        for a, b in _chunks(T, L * n_e):
            pc = np.asarray(pr[a:b])
            if not np.isfinite(pc).all() or (pc < 0).any():
                raise InputError(
                    "expected finite, non-negative router probabilities", source=src, field="probs"
                )
    sn = trace.spec_next
    if sn is not None:
        _need_array(sn, "spec_next", src, kinds="iu", shape=(T, L, K), what=f"int16/int32 [T, L, K] = [{T}, {L}, {K}]")
        n_e = E if E is not None else (trace.probs.shape[2] if trace.probs is not None else None)
        for a, b in _chunks(T, L * K):
            c = np.asarray(sn[a:b]).astype(np.int64, copy=False)
            bad = (c < -1) | ((c >= n_e) if n_e is not None else False)
            if bad.any():
                pos = np.argwhere(bad)[0] + (a, 0, 0)
                raise InputError(
                    f"expert id {int(c[tuple(pos - (a, 0, 0))])} at {_where(pos)}; expected -1 or an id "
                    + (f"below {n_e}" if n_e is not None else ">= 0"),
                    source=src,
                    field="spec_next",
                )
    for name in ("request", "token", "step", "phase"):
        a = getattr(trace, name)
        if a is None:
            continue
        _need_array(a, name, src, kinds="iu", shape=(T,), what=f"int32 [T] (T = {T})")
        a = np.asarray(a)
        if name == "phase":
            if not np.isin(a, (0, 1)).all():
                raise InputError(
                    "expected 0 (prefill) or 1 (decode) in every row", source=src, field=name
                )
        elif (a < 0).any():
            raise InputError(f"has negative values at row {int(np.argmax(a < 0))}; expected >= 0", source=src, field=name)
        if name == "step" and T > 1 and (np.diff(a.astype(np.int64)) < 0).any():
            r = int(np.argmax(np.diff(a.astype(np.int64)) < 0)) + 1
            raise InputError(
                f"decreases at row {r}; rows are in execution order, so steps never decrease",
                source=src,
                field=name,
            )


def _int_dtype(dt: np.dtype) -> bool:
    # signed integers hold -1; small unsigned ones convert to int64 exactly
    return dt.kind == "i" or (dt.kind == "u" and dt.itemsize <= 4)


def _need_array(a, name, src, *, kinds, what, shape=None, ndim=None) -> None:
    ok = isinstance(a, np.ndarray) and a.dtype.kind in kinds
    if ok and a.dtype.kind == "u" and a.dtype.itemsize > 4:
        ok = False
    if ok and shape is not None and tuple(a.shape) != tuple(shape):
        ok = False
    if ok and ndim is not None and a.ndim != ndim:
        ok = False
    if not ok:
        got = f"dtype {a.dtype} shape {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise InputError(f"expected {what}, got {got}", source=src, field=name)


def _check_expert_values(e: np.ndarray, E, src) -> int:
    """Range and duplicate checks of ``experts`` (chunked); returns the largest id."""
    T, L, K = e.shape
    hi = -1
    for a, b in _chunks(T, L * K):
        c = np.asarray(e[a:b]).astype(np.int64, copy=False)
        if (c < -1).any():
            pos = np.argwhere(c < -1)[0] + (a, 0, 0)
            raise InputError(
                f"expert id {int(c[tuple(pos - (a, 0, 0))])} at {_where(pos)}; expected ids >= 0, or -1 "
                "for no expert",
                source=src,
                field="experts",
            )
        m = int(c.max())
        if E is not None and m >= E:
            pos = np.argwhere(c >= E)[0] + (a, 0, 0)
            raise InputError(
                f"expert id {int(c[tuple(pos - (a, 0, 0))])} at {_where(pos)}; meta num_experts is {E}, "
                f"so ids must be < {E}",
                source=src,
                field="experts",
            )
        hi = max(hi, m)
        if K > 1:
            s = np.sort(c, axis=2)
            dup = (s[:, :, 1:] == s[:, :, :-1]) & (s[:, :, 1:] != -1)
            if dup.any():
                t, l, k = np.argwhere(dup)[0]
                raise InputError(
                    f"expert {int(s[t, l, k])} appears twice in row {int(t) + a}, column {int(l)}; "
                    "expected distinct experts per (token, layer) (-1 may repeat)",
                    source=src,
                    field="experts",
                )
    return hi


def _check_meta(meta, L: int, K: int, src) -> dict:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise InputError(f"expected a JSON object (dict), got {type(meta).__name__}", source=src, field="meta")
    fv = meta.get("format_version")
    if fv is not None:
        if not _is_int(fv) or fv < 1:
            raise InputError(f"expected a positive integer, got {fv!r}", source=src, field="meta.format_version")
        if fv > FORMAT_VERSION:
            raise InputError(
                f"is {fv}, newer than this moesim reads ({FORMAT_VERSION}); upgrade moesim",
                source=src,
                field="meta.format_version",
            )
    for key in ("model", "source", "licence"):
        v = meta.get(key)
        if v is not None and not isinstance(v, str):
            raise InputError(f"expected a string, got {type(v).__name__}", source=src, field=f"meta.{key}")
    cw = meta.get("captured_with")
    if cw is not None and not isinstance(cw, (str, dict)):
        raise InputError(
            f"expected a string or an object, got {type(cw).__name__}", source=src, field="meta.captured_with"
        )
    ne = meta.get("num_experts")
    if ne is not None and (not _is_int(ne) or ne < 1):
        raise InputError(f"expected a positive integer, got {ne!r}", source=src, field="meta.num_experts")
    tk = meta.get("top_k")
    if tk is not None and (not _is_int(tk) or not 1 <= tk <= K):
        raise InputError(
            f"expected an integer from 1 to {K} (the experts array's rank dimension), got {tk!r}",
            source=src,
            field="meta.top_k",
        )
    layers = meta.get("layers")
    if layers is not None:
        if not isinstance(layers, (list, tuple)) or not all(_is_int(x) for x in layers):
            raise InputError(
                "expected a list of integers (the model layer index of each column)",
                source=src,
                field="meta.layers",
            )
        if len(layers) != L:
            raise InputError(
                f"has {len(layers)} entries but experts has {L} layer columns; expected one model "
                "layer index per column",
                source=src,
                field="meta.layers",
            )
        if any(x < 0 for x in layers) or any(b <= a for a, b in zip(layers, layers[1:])):
            raise InputError(
                f"expected strictly increasing non-negative layer indices, got {_short(layers)}",
                source=src,
                field="meta.layers",
            )
    return meta


def _short(xs, n: int = 8) -> str:
    xs = list(xs)
    s = ", ".join(str(x) for x in xs[:n])
    return f"[{s}{', ...' if len(xs) > n else ''}]"


# ----------------------------------------------------------------------------------------------
# trace vs model


def check_trace_against_model(
    trace: Trace,
    *,
    num_experts: int,
    moe_layers,
    layers=None,
    source: str | None = None,
) -> tuple[int, ...]:
    """The model layer index of each trace column, after checking the trace fits the model.

    Columns map to ``layers`` when given (the scenario's ``trace.layers``), else to
    ``meta['layers']``, else to the model's ``moe_layers`` when the trace has exactly that many
    columns. Raises :class:`InputError` when the column count differs, a layer is not one of the
    model's MoE layers, or an expert id is ``>= num_experts`` (experts per MoE layer of the model).
    """
    moe = tuple(int(x) for x in moe_layers)
    L = trace.num_layers
    if layers is not None:
        cols, fld = list(layers), "trace.layers"
        if not all(_is_int(x) for x in cols):
            raise InputError("expected a list of integer model layer indices", source=source, field=fld)
        if any(b <= a for a, b in zip(cols, cols[1:])):
            raise InputError(
                f"expected strictly increasing layer indices, got {_short(cols)}", source=source, field=fld
            )
    elif trace.layers is not None:
        cols, fld = list(trace.layers), "meta.layers"
    elif L == len(moe):
        cols, fld = list(moe), None
    else:
        raise InputError(
            f"has {L} layer columns but the model has {len(moe)} MoE layers and the trace does not "
            "say which layers its columns are; set trace.layers (or meta 'layers')",
            source=source,
            field="experts",
        )
    if len(cols) != L:
        raise InputError(
            f"names {len(cols)} layers but the trace has {L} layer columns; expected one model "
            "layer index per column",
            source=source,
            field=fld,
        )
    moe_set = set(moe)
    for c in cols:
        if int(c) not in moe_set:
            raise InputError(
                f"layer {c} is not an MoE layer of the model (its MoE layers: {_short(moe, 12)})",
                source=source,
                field=fld or "experts",
            )
    e = trace.experts
    T = trace.num_tokens
    for a, b in _chunks(T, L * trace.top_k):
        c = np.asarray(e[a:b])
        if (c >= num_experts).any():
            pos = np.argwhere(c >= num_experts)[0]
            val = int(c[tuple(pos)])
            pos = pos + (a, 0, 0)
            raise InputError(
                f"expert id {val} at {_where(pos)}, but the model has {num_experts} experts per "
                f"MoE layer; expected ids < {num_experts}",
                source=source,
                field="experts",
            )
    if trace.probs is not None and trace.probs.shape[2] != num_experts:
        raise InputError(
            f"has {trace.probs.shape[2]} experts in its last dimension, the model {num_experts}",
            source=source,
            field="probs",
        )
    if trace.spec_next is not None:
        for a, b in _chunks(T, L * trace.top_k):
            c = np.asarray(trace.spec_next[a:b])
            if (c >= num_experts).any():
                pos = np.argwhere(c >= num_experts)[0]
                raise InputError(
                    f"expert id {int(c[tuple(pos)])} at {_where(pos + (a, 0, 0))}, but the model has "
                    f"{num_experts} experts per MoE layer",
                    source=source,
                    field="spec_next",
                )
    return tuple(int(c) for c in cols)
