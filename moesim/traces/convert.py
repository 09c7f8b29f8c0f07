"""Converters between the moesim trace format and other routing-log formats.

* RouterTrace JSON (as written by the stratamoe-lab capture tools): ``selections[t][layer]`` is the
  list of expert ids token ``t`` chose at the ``layer``-th logged MoE layer.
* Parquet long form (DESIGN 3.3): one row per (token-step, layer, rank) choice with columns
  ``request, token, step, layer, rank, expert, weight`` (+ ``row``, and ``phase`` when known).
* JSONL form: an optional header line, then one object per token row
  ``{"request", "token", "step", "phase", "experts": [[ids per layer]], "weights": [[...]]}``.
* Per-layer lists: ``{"<layer>": [[ids of token 0], [ids of token 1], ...], ...}`` (reader only).
* Padding / warm-up rows of serving-engine logs: :func:`detect_padding` / :func:`drop_padding`
  (runs of :data:`PADDING_MIN_RUN` or more identical consecutive rows; counted in
  ``meta['dropped_rows']`` / ``meta['dropped_reason']``).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from moesim.errors import InputError
from moesim.traces.format import FORMAT_VERSION, Trace, _is_int, _json_default, _why, validate_trace

# ----------------------------------------------------------------------------------------------
# RouterTrace JSON


def _default_layers(model: str, count: int) -> list[int] | None:
    """Model layer indices of a RouterTrace's columns, for models whose layout is known.

    Switch Transformers (T5 blocks, ``encoder_sparse_step = 2``) put the sparse MLP in every
    odd-numbered block, so the ``count`` logged encoder layers are blocks 1, 3, 5, ...
    """
    name = model.lower().rsplit("/", 1)[-1]
    if re.fullmatch(r"switch-(base|large|xxl|c)-\d+", name):
        return [2 * i + 1 for i in range(count)]
    return None


def _captured_with(info: dict) -> str:
    """A readable one-liner from a RouterTrace ``source`` block (missing parts are skipped)."""
    s = info.get("source") if isinstance(info.get("source"), dict) else {}
    parts = []
    sw = s.get("software") if isinstance(s.get("software"), dict) else {}
    libs = [f"{k} {sw[v]}" for k, v in (("transformers", "transformersVersion"), ("PyTorch", "pytorchVersion")) if v in sw]
    if libs:
        parts.append(", ".join(libs))
    cap = s.get("capture") if isinstance(s.get("capture"), dict) else {}
    if cap:
        bits = [str(cap[k]) for k in ("device", "dtype") if k in cap]
        seed = cap.get("seed", info.get("seed"))
        parts.append(" ".join(["on"] + bits if bits else []) + (f" (seed {seed})" if seed is not None else ""))
    mdl = s.get("model") if isinstance(s.get("model"), dict) else {}
    if mdl.get("id"):
        parts.append(f"model {mdl['id']}" + (f" revision {mdl['revision']}" if mdl.get("revision") else ""))
    tok = s.get("tokenizer") if isinstance(s.get("tokenizer"), dict) else {}
    if tok.get("revision"):
        parts.append(f"tokenizer revision {tok['revision']}")
    wl = s.get("workload") if isinstance(s.get("workload"), dict) else {}
    if wl:
        parts.append(
            "workload " + " ".join(str(x) for x in (wl.get("kind"), f"sha256 {wl['sha256']}" if wl.get("sha256") else None) if x)
        )
    head = f"RouterTrace v{info.get('version', '?')}"
    if s.get("kind"):
        head += f" ({s['kind']})"
    if info.get("scenario"):
        head += f", scenario {info['scenario']!r}"
    return "; ".join([head] + [p.strip() for p in parts if p.strip()])


def from_router_trace_json(
    path: str | os.PathLike,
    *,
    model: str | None = "google/switch-base-8",
    layers=None,
    source: str | None = None,
    licence: str | None = None,
) -> Trace:
    """Read a RouterTrace JSON routing log as a :class:`Trace`.

    Uses ``expertsPerLayer`` (experts per layer), ``layers`` (column count, or a list of layer
    indices), ``topK``, ``tokens`` (checked against the rows) and ``selections[t][layer]`` (expert
    ids, best first; shorter lists are padded with ``-1``). ``model`` must agree with the file's
    ``source.model.id`` when both are given (``None``: take the file's). ``layers`` = model layer
    index of each column; by default taken from the file or from the model's known layout
    (Switch: odd blocks 1, 3, 5, ...). ``source`` / ``licence`` fill those meta keys. The file's
    other top-level fields are kept under ``meta['router_trace']``. The JSON format has no prompt
    boundaries, so ``request`` / ``token`` are left out.
    """
    p = Path(path)
    src = str(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("not found (expected a RouterTrace JSON file)", source=src) from None
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot be read ({_why(exc)})", source=src) from None
    try:
        d = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InputError(f"is not valid JSON ({_why(exc)})", source=src) from None
    if not isinstance(d, dict):
        raise InputError(f"expected a JSON object at the top, got {type(d).__name__}", source=src)

    def need_int(key, lo=1, required=True):
        v = d.get(key)
        if v is None and not required:
            return None
        if not _is_int(v) or v < lo:
            raise InputError(f"expected an integer >= {lo}, got {v!r}", source=src, field=key)
        return int(v)

    E = need_int("expertsPerLayer")
    lay = d.get("layers")
    file_layers = None
    if isinstance(lay, list):
        file_layers = lay
        n_layers = len(lay)
    else:
        n_layers = need_int("layers")
    top_k = need_int("topK", required=False)
    n_tok = need_int("tokens", lo=0, required=False)
    sel = d.get("selections")
    if not isinstance(sel, list) or not sel:
        raise InputError("expected a non-empty list of rows [token][layer] -> expert ids", source=src, field="selections")
    if n_tok is not None and n_tok != len(sel):
        raise InputError(f"says {n_tok} tokens but selections has {len(sel)} rows", source=src, field="tokens")

    experts = _selections_array(sel, n_layers, top_k, E, src)
    K = experts.shape[2]

    # model identity
    s = d.get("source") if isinstance(d.get("source"), dict) else {}
    mdl = s.get("model") if isinstance(s.get("model"), dict) else {}
    file_model = mdl.get("id") if isinstance(mdl.get("id"), str) else None
    if model is None:
        if file_model is None:
            raise InputError("names no model (source.model.id); pass the model explicitly", source=src, field="source.model.id")
        model = file_model
    elif file_model is not None and file_model.lower() != model.lower():
        raise InputError(
            f"is {file_model!r}, but the conversion was asked for model {model!r}; pass the file's model",
            source=src,
            field="source.model.id",
        )

    if layers is not None:
        cols = [int(x) for x in layers]
        if len(cols) != n_layers:
            raise InputError(
                f"{len(cols)} layer indices given for {n_layers} logged layers", source=src, field="layers"
            )
    elif file_layers is not None:
        cols = file_layers
    else:
        cols = _default_layers(model, n_layers)

    info = {k: v for k, v in d.items() if k != "selections"}
    default_source = f"RouterTrace JSON {p.name}"
    if d.get("scenario"):
        default_source += f" (scenario {d['scenario']!r})"
    meta = {
        "format_version": FORMAT_VERSION,
        "model": model,
        "num_experts": E,
        "top_k": top_k if top_k is not None else K,
        "source": source or default_source,
        "licence": licence or "unspecified (see the capturing repository)",
        "captured_with": _captured_with(d),
        "router_trace": info,
    }
    if cols is not None:
        meta["layers"] = list(cols)
    trace = Trace(experts=experts, meta=meta)
    try:
        validate_trace(trace, src)
    except InputError as exc:
        # rows and columns of `experts` are those of `selections`
        fld = "selections" if exc.field == "experts" else ("layers" if exc.field == "meta.layers" else exc.field)
        raise InputError(exc.message, source=src, field=fld) from None
    return trace


def _selections_array(sel: list, n_layers: int, top_k: int | None, E: int, src: str) -> np.ndarray:
    """``selections`` as an int16/int32 array [T, L, K] (-1 = no expert), with precise errors."""
    dtype = np.int16 if E <= np.iinfo(np.int16).max else np.int32
    try:  # fast path: a regular nested list of ints
        a = np.asarray(sel)
        if a.ndim == 3 and a.dtype.kind == "i" and a.shape[1] == n_layers and a.shape[2] >= 1:
            if (top_k is None or a.shape[2] <= top_k) and a.size and a.min() >= 0 and a.max() < E:
                K = top_k if top_k is not None else a.shape[2]
                out = np.full((a.shape[0], n_layers, K), -1, dtype=dtype)
                out[:, :, : a.shape[2]] = a
                return out
    except (ValueError, TypeError, OverflowError):
        pass
    K = top_k
    if K is None:
        K = max((len(x) if isinstance(x, list) else 1 for row in sel if isinstance(row, list) for x in row), default=1)
        K = max(K, 1)
    out = np.full((len(sel), n_layers, K), -1, dtype=dtype)
    for t, row in enumerate(sel):
        if not isinstance(row, list) or len(row) != n_layers:
            raise InputError(
                f"expected a list of {n_layers} layers, got {_kind(row)}", source=src, field=f"selections[{t}]"
            )
        for l, ids in enumerate(row):
            if _is_int(ids):
                ids = [ids]
            fld = f"selections[{t}][{l}]"
            if not isinstance(ids, list) or not all(_is_int(x) for x in ids):
                raise InputError(f"expected a list of expert ids, got {_kind(ids)}", source=src, field=fld)
            if len(ids) > K:
                raise InputError(f"has {len(ids)} experts, more than topK={K}", source=src, field=fld)
            for x in ids:
                if not 0 <= x < E:
                    raise InputError(
                        f"expert id {x} outside 0..{E - 1} (expertsPerLayer={E})", source=src, field=fld
                    )
            out[t, l, : len(ids)] = ids
    return out


def _kind(x) -> str:
    s = json.dumps(x) if not isinstance(x, (bytes,)) else repr(x)
    return s if len(s) <= 40 else s[:37] + "..."


# ----------------------------------------------------------------------------------------------
# Parquet long form

_META_KEY = b"moesim.meta"
_SHAPE_KEY = b"moesim.shape"


def to_parquet_long(trace: Trace, path: str | os.PathLike) -> Path:
    """Write ``trace`` in Parquet long form, one row per chosen expert (``-1`` slots are left out).

    Columns: ``row`` (trace row), ``request``, ``token``, ``step`` (null when the trace lacks
    them), ``layer`` (model layer index from ``meta['layers']``, else the column index), ``rank``,
    ``expert``, ``weight`` (null without weights), ``phase`` (only when present). The trace's meta
    and shape ride in the schema metadata, so :func:`from_parquet_long` restores the trace exactly
    (``probs`` are not carried). Written atomically.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    dst = str(path)
    validate_trace(trace, dst)
    e = np.asarray(trace.experts)
    T, L, K = e.shape
    t, l, k = np.nonzero(e != -1)
    n = t.size
    cols = trace.layers
    layer_vals = np.asarray(cols, dtype=np.int32)[l] if cols is not None else l.astype(np.int32)

    def per_row(a):
        return pa.array(np.asarray(a)[t].astype(np.int32)) if a is not None else pa.nulls(n, pa.int32())

    data = {
        "row": pa.array(t.astype(np.int64)),
        "request": per_row(trace.request),
        "token": per_row(trace.token),
        "step": per_row(trace.step),
        "layer": pa.array(layer_vals),
        "rank": pa.array(k.astype(np.int16)),
        "expert": pa.array(e[t, l, k].astype(np.int32)),
        "weight": pa.array(np.asarray(trace.weights)[t, l, k].astype(np.float32))
        if trace.weights is not None
        else pa.nulls(n, pa.float32()),
    }
    if trace.phase is not None:
        data["phase"] = pa.array(np.asarray(trace.phase)[t].astype(np.int8))
    table = pa.table(data)
    meta = dict(trace.meta or {})
    meta.setdefault("format_version", FORMAT_VERSION)
    extra = {
        _META_KEY: json.dumps(meta, sort_keys=True, default=_json_default).encode(),
        _SHAPE_KEY: json.dumps(
            {"T": T, "L": L, "K": K, "experts_dtype": str(e.dtype), "weights_dtype": str(trace.weights.dtype) if trace.weights is not None else None}
        ).encode(),
    }
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **extra})
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def from_parquet_long(path: str | os.PathLike) -> Trace:
    """Read a Parquet long-form trace (see :func:`to_parquet_long`) back into a :class:`Trace`.

    Needs columns ``layer``, ``rank``, ``expert`` and either ``row`` or ``request`` + ``token``
    (rows then follow first appearance). Files from other tools (no moesim schema metadata) get
    ``meta['layers']`` = the sorted distinct ``layer`` values.
    """
    import pyarrow.parquet as pq

    src = str(path)
    if not Path(path).exists():
        raise InputError("not found (expected a Parquet long-form trace)", source=src)
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise InputError(f"not a readable Parquet file ({_why(exc)})", source=src) from None
    names = set(table.column_names)
    for c in ("layer", "rank", "expert"):
        if c not in names:
            raise InputError("missing column; long form needs layer, rank, expert", source=src, field=c)
    md = table.schema.metadata or {}
    try:
        meta = json.loads(md[_META_KEY]) if _META_KEY in md else {}
        shape = json.loads(md[_SHAPE_KEY]) if _SHAPE_KEY in md else None
    except (ValueError, RecursionError) as exc:
        raise InputError(f"bad moesim schema metadata ({_why(exc)})", source=src, field="meta") from None
    if not isinstance(meta, dict) or (shape is not None and not isinstance(shape, dict)):
        raise InputError("bad moesim schema metadata", source=src, field="meta")

    def col(name, dtype=np.int64):
        c = table.column(name)
        if c.null_count:
            return None
        try:
            return np.asarray(c.to_numpy(), dtype=dtype)
        except (TypeError, ValueError) as exc:
            raise InputError(f"expected numbers ({_why(exc)})", source=src, field=name) from None

    layer, rank, expert = col("layer"), col("rank"), col("expert")
    for name, a in (("layer", layer), ("rank", rank), ("expert", expert)):
        if a is None:
            raise InputError("has null values", source=src, field=name)
        if a.size and a.min() < 0:
            raise InputError("has negative values", source=src, field=name)
    row = col("row") if "row" in names else None
    if row is None:
        req = col("request") if "request" in names else None
        tok = col("token") if "token" in names else None
        if req is None or tok is None:
            raise InputError("needs a row column, or request and token columns without nulls", source=src, field="row")
        keys = np.stack([req, tok], axis=1)
        _, first, inv = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")
        rank_of = np.empty_like(order)
        rank_of[order] = np.arange(order.size)
        row = rank_of[inv.reshape(-1)]
    T = int(shape["T"]) if shape else (int(row.max()) + 1 if row.size else 0)
    K = int(shape["K"]) if shape else (int(rank.max()) + 1 if rank.size else 1)
    layers_meta = meta.get("layers")
    if isinstance(layers_meta, list) and layers_meta:
        lv = np.asarray(layers_meta, dtype=np.int64)
        colidx = np.searchsorted(lv, layer)
        ok = (colidx < lv.size) & (lv[np.minimum(colidx, lv.size - 1)] == layer)
        if not ok.all():
            raise InputError(f"layer {int(layer[~ok][0])} is not in meta layers", source=src, field="layer")
        L = lv.size
    elif shape:
        L, colidx = int(shape["L"]), layer
    else:
        uniq = np.unique(layer)
        colidx = np.searchsorted(uniq, layer)
        L = uniq.size
        meta["layers"] = [int(x) for x in uniq]
    if row.size and (row.max() >= T or rank.max() >= K or colidx.max() >= L):
        raise InputError("row, layer or rank outside the shape in the schema metadata", source=src, field="row")
    e_dtype = np.dtype((shape or {}).get("experts_dtype") or (np.int16 if (expert.max(initial=0) < 2**15) else np.int32))
    experts = np.full((T, L, K), -1, dtype=e_dtype)
    flat = (row * L + colidx) * K + rank
    if np.unique(flat).size != flat.size:
        raise InputError("the same (row, layer, rank) appears twice", source=src, field="rank")
    experts.reshape(-1)[flat] = expert
    out = Trace(experts=experts, meta=meta)
    w = col("weight", np.float64) if "weight" in names else None
    if w is not None:
        wd = np.dtype((shape or {}).get("weights_dtype") or np.float32)
        weights = np.zeros((T, L, K), dtype=wd)
        weights.reshape(-1)[flat] = w
        out.weights = weights
    for name, dt in (("request", np.int32), ("token", np.int32), ("step", np.int32), ("phase", np.int8)):
        if name in names:
            v = col(name)
            if v is not None:
                a = np.zeros(T, dtype=dt)
                a[row] = v
                setattr(out, name, a)
    validate_trace(out, src)
    return out


# ----------------------------------------------------------------------------------------------
# padding / warm-up rows of serving-engine logs

#: Default shortest run of identical consecutive rows that :func:`detect_padding` treats as padding.
PADDING_MIN_RUN = 64

PADDING_RULE = (
    "runs of {n} or more consecutive rows with identical routing in every layer and rank "
    "(and identical gate weights when present)"
)


def detect_padding(experts, min_run: int = PADDING_MIN_RUN, *, weights=None) -> tuple[np.ndarray, int]:
    """Rows of a serving-engine log that are not real tokens: ``(mask, count)``, ``mask[t]`` True = drop.

    Rule: a run of ``min_run`` (default 64) or more *consecutive* rows whose routing is identical
    in every MoE layer and every rank (and whose gate weights are identical too, when ``weights``
    is given) is padding, and the whole run is dropped. A captured CUDA graph's padded batch
    slots, and warm-up passes over a dummy input, repeat one routing row hundreds or thousands of
    times in a row. Real tokens almost never repeat their full routing across all layers even a
    few times (the bundled switch-base-8 trace's longest run is 2 rows, over 6 layers), so genuine
    repeats survive. Padding interleaved with real rows in runs shorter than ``min_run`` (e.g.
    few padded slots per step) is not detected. Arrays may be memory-mapped; they are scanned in
    chunks.
    """
    if not _is_int(min_run) or min_run < 2:
        raise ValueError(f"min_run must be an integer >= 2, got {min_run!r}")
    e = experts
    T = int(e.shape[0])
    row_entries = int(np.prod(e.shape[1:])) if e.ndim > 1 else 1
    same = np.zeros(T, dtype=bool)  # same[t]: row t equals row t-1
    step = max(1, (1 << 22) // max(1, row_entries))
    for a in range(1, T, step):
        b = min(T, a + step)
        cur = np.asarray(e[a:b]).reshape(b - a, -1)
        prev = np.asarray(e[a - 1 : b - 1]).reshape(b - a, -1)
        s = (cur == prev).all(axis=1)
        if weights is not None:
            wc = np.asarray(weights[a:b]).reshape(b - a, -1)
            wp = np.asarray(weights[a - 1 : b - 1]).reshape(b - a, -1)
            s &= ((wc == wp) | (np.isnan(wc) & np.isnan(wp))).all(axis=1)
        same[a:b] = s
    mask = np.zeros(T, dtype=bool)
    if T == 0:
        return mask, 0
    starts = np.flatnonzero(~same)  # same[0] is False: row 0 starts a run
    lengths = np.diff(np.append(starts, T))
    for s0, n in zip(starts[lengths >= min_run], lengths[lengths >= min_run]):
        mask[s0 : s0 + n] = True
    return mask, int(mask.sum())


def drop_padding(
    trace: Trace, *, keep_padding: bool = False, min_run: int = PADDING_MIN_RUN, source: str | None = None
) -> Trace:
    """Apply :func:`detect_padding` to ``trace`` and record the outcome in its meta.

    Sets ``meta['dropped_rows']`` (rows removed by this and earlier conversions) and
    ``meta['dropped_reason']``; with ``keep_padding=True`` nothing is removed and the reason says
    how many padding rows were kept. Returns a new :class:`Trace` when rows are removed (all
    per-row arrays are cut the same way), else ``trace`` with its meta updated. A trace that is
    padding throughout raises :class:`InputError`.
    """
    mask, n = detect_padding(trace.experts, min_run, weights=trace.weights)
    meta = dict(trace.meta or {})
    prev = meta.get("dropped_rows") if _is_int(meta.get("dropped_rows")) else 0
    rule = PADDING_RULE.format(n=min_run)
    if n == 0:
        if "dropped_rows" not in meta:
            meta["dropped_rows"] = 0
            meta["dropped_reason"] = f"no padding rows found ({rule})"
        trace.meta = meta
        return trace
    if keep_padding:
        meta.setdefault("dropped_rows", prev)
        meta["dropped_reason"] = f"kept {n} rows that look like padding ({rule}) as asked"
        trace.meta = meta
        return trace
    if n == trace.num_tokens:
        raise InputError(
            f"every one of its {n} rows looks like padding ({rule}); pass keep_padding (--keep-padding) to keep them",
            source=source,
            field="experts",
        )
    keep = ~mask
    meta["dropped_rows"] = prev + n
    meta["dropped_reason"] = f"padding / warm-up rows: {rule}"
    arrays = {name: np.asarray(a)[keep] for name, a in trace.arrays().items()}
    return Trace(**arrays, meta=meta)


# ----------------------------------------------------------------------------------------------
# JSONL form

_JSONL_HEADER = "moesim_trace"
_ROW_FIELDS = (("request", np.int32), ("token", np.int32), ("step", np.int32), ("phase", np.int8))


def to_jsonl(trace: Trace, path: str | os.PathLike) -> Path:
    """Write ``trace`` as JSON lines: a header line, then one object per token row.

    Header: ``{"moesim_trace": {"format_version", "shape": [T, L, K], "dtypes": {...}, "meta": {...}}}``
    (lets :func:`from_jsonl` restore arrays and meta exactly). Rows:
    ``{"request", "token", "step", "phase", "experts": [[ids per layer]], "weights": [[...]]}``;
    the per-row fields and ``weights`` appear only when the trace has them, expert lists keep
    their ``-1`` slots. ``probs`` are not carried. Written atomically.
    """
    dst = str(path)
    validate_trace(trace, dst)
    e = trace.experts
    T, L, K = (int(x) for x in e.shape)
    meta = dict(trace.meta or {})
    meta.setdefault("format_version", FORMAT_VERSION)
    dtypes = {name: str(a.dtype) for name, a in trace.arrays().items() if name != "probs"}
    header = {_JSONL_HEADER: {"format_version": FORMAT_VERSION, "shape": [T, L, K], "dtypes": dtypes, "meta": meta}}
    per_row = [(n, np.asarray(getattr(trace, n))) for n, _ in _ROW_FIELDS if getattr(trace, n) is not None]
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(header, sort_keys=True, default=_json_default) + "\n")
                step = max(1, (1 << 20) // max(1, L * K))
                for a in range(0, T, step):
                    b = min(T, a + step)
                    ec = np.asarray(e[a:b]).tolist()
                    wc = np.asarray(trace.weights[a:b]).tolist() if trace.weights is not None else None
                    for i in range(b - a):
                        row = {n: int(v[a + i]) for n, v in per_row}
                        row["experts"] = ec[i]
                        if wc is not None:
                            row["weights"] = wc[i]
                        fh.write(json.dumps(row, separators=(",", ":")) + "\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, p)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except (OSError, TypeError, ValueError) as exc:
        raise InputError(f"cannot be written ({_why(exc)})", source=dst) from None
    return p


def _read_text(path, what: str) -> str:
    src = str(path)
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"not found (expected {what})", source=src) from None
    except IsADirectoryError:
        raise InputError(f"is a directory (expected {what})", source=src) from None
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot be read ({_why(exc)})", source=src) from None


def _json_line(line: str, src: str):
    try:
        return json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise InputError(f"is not valid JSON ({_why(exc)})", source=src) from None


def _int_ok(x, lo: int = 0, hi: int = 2**31 - 1) -> bool:
    return _is_int(x) and lo <= x <= hi


def _num_ok(x) -> bool:
    return isinstance(x, float) or (_is_int(x) and abs(x) < 2**53)


def from_jsonl(
    path: str | os.PathLike,
    *,
    model: str | None = None,
    keep_padding: bool = False,
    min_run: int = PADDING_MIN_RUN,
) -> Trace:
    """Read the JSONL form (see :func:`to_jsonl`) into a :class:`Trace`; padding rows are dropped.

    The header line is optional: without it, ``K`` is the longest expert list (shorter lists are
    padded with ``-1``), dtypes are int16/int32 (experts), float32 (weights), int32/int8 (per-row
    fields) and meta gets ``top_k`` and ``source``. Each row needs ``experts`` (a list with one
    list of expert ids per layer, the same number of layers in every row); ``request``,
    ``token``, ``step``, ``phase`` and ``weights`` must be in every row or in none. Other keys
    are ignored; blank lines are skipped. ``model`` sets ``meta['model']``. Malformed input
    raises :class:`InputError` naming ``file:line`` and the field.
    """
    src = str(path)
    text = _read_text(path, "a JSONL trace: one JSON object per token row")
    header = None
    rows_e: list = []
    rows_w: list = []
    fields: dict[str, list] = {n: [] for n, _ in _ROW_FIELDS}
    present: dict[str, bool] | None = None
    L = None
    K_max = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{src}:{lineno}"
        obj = _json_line(line, where)
        if not isinstance(obj, dict):
            raise InputError(f"expected a JSON object per line, got {_kind(obj)}", source=where)
        if _JSONL_HEADER in obj and "experts" not in obj:
            if header is not None or rows_e:
                raise InputError("header line must come first, once", source=where, field=_JSONL_HEADER)
            header = obj[_JSONL_HEADER]
            _check_jsonl_header(header, where)
            continue
        if "experts" not in obj:
            raise InputError("missing; every row needs its expert ids per layer", source=where, field="experts")
        ex = obj["experts"]
        if not isinstance(ex, list) or not ex:
            raise InputError(f"expected a non-empty list of per-layer expert-id lists, got {_kind(ex)}", source=where, field="experts")
        if L is None:
            L = len(ex)
        elif len(ex) != L:
            raise InputError(f"has {len(ex)} layers, earlier rows {L}", source=where, field="experts")
        row = []
        for l, ids in enumerate(ex):
            if _is_int(ids):
                ids = [ids]
            if not isinstance(ids, list) or not all(_int_ok(x, -1) for x in ids):
                raise InputError(
                    f"expected a list of expert ids (integers >= 0, or -1), got {_kind(ids)}", source=where, field=f"experts[{l}]"
                )
            row.append(ids)
            K_max = max(K_max, len(ids))
        rows_e.append(row)
        has = {n: n in obj and obj[n] is not None for n, _ in _ROW_FIELDS}
        has["weights"] = "weights" in obj and obj["weights"] is not None
        if present is None:
            present = has
        elif has != present:
            diff = next(n for n in has if has[n] != present[n])
            raise InputError(
                f"{'present' if has[diff] else 'missing'} here but {'missing' if has[diff] else 'present'} in "
                "earlier rows; give it in every row or in none",
                source=where,
                field=diff,
            )
        for n, _ in _ROW_FIELDS:
            if has[n]:
                v = obj[n]
                if n == "phase" and isinstance(v, str) and v in ("prefill", "decode"):
                    v = 0 if v == "prefill" else 1
                if not _int_ok(v) or (n == "phase" and v not in (0, 1)):
                    want = "0 (prefill) or 1 (decode)" if n == "phase" else "an integer >= 0"
                    raise InputError(f"expected {want}, got {_kind(v)}", source=where, field=n)
                fields[n].append(v)
        if has["weights"]:
            w = obj["weights"]
            if not isinstance(w, list) or len(w) != L:
                raise InputError(f"expected {L} per-layer lists of gate weights, got {_kind(w)}", source=where, field="weights")
            for l, ws in enumerate(w):
                if _num_ok(ws):
                    ws = [ws]
                if not isinstance(ws, list) or len(ws) != len(row[l]) or not all(_num_ok(x) for x in ws):
                    raise InputError(
                        f"expected {len(row[l])} numbers (one per expert id), got {_kind(ws)}", source=where, field=f"weights[{l}]"
                    )
            rows_w.append(w)
    if not rows_e:
        raise InputError("has no token rows (expected one JSON object per row with 'experts')", source=src)
    hdr_meta = dict(header.get("meta") or {}) if header else {}
    dtypes = header.get("dtypes", {}) if header else {}
    K = K_max
    if header and header.get("shape"):
        hT, hL, hK = header["shape"]
        if hL != L or hK < K_max:
            raise InputError(f"says shape {header['shape']} but rows have {L} layers and up to {K_max} ids", source=src, field="moesim_trace.shape")
        if hT != len(rows_e):
            raise InputError(f"says {hT} rows but the file has {len(rows_e)}", source=src, field="moesim_trace.shape")
        K = hK
    T = len(rows_e)
    hi = max((x for r in rows_e for ids in r for x in ids), default=0)
    e_dt = np.dtype(dtypes.get("experts") or (np.int16 if hi < 2**15 else np.int32))
    if hi > np.iinfo(e_dt).max:
        raise InputError(f"expert id {hi} does not fit dtype {e_dt}", source=src, field="experts")
    experts = np.full((T, L, K), -1, dtype=e_dt)
    weights = np.zeros((T, L, K), dtype=np.dtype(dtypes.get("weights") or np.float32)) if rows_w else None
    for t, row in enumerate(rows_e):
        for l, ids in enumerate(row):
            if not isinstance(ids, list):
                ids = [ids]
            experts[t, l, : len(ids)] = ids
            if weights is not None:
                ws = rows_w[t][l]
                weights[t, l, : len(ids)] = ws if isinstance(ws, list) else [ws]
    meta = hdr_meta
    meta.setdefault("format_version", FORMAT_VERSION)
    meta.setdefault("top_k", K)
    meta.setdefault("source", f"JSONL {Path(src).name}")
    if model is not None:
        meta["model"] = model
    out = Trace(experts=experts, weights=weights, meta=meta)
    for n, dt in _ROW_FIELDS:
        if present and present[n]:
            d = np.dtype(dtypes.get(n) or dt)
            vals = fields[n]
            if max(vals) > np.iinfo(d).max:
                raise InputError(f"value {max(vals)} does not fit dtype {d}", source=src, field=n)
            setattr(out, n, np.asarray(vals, dtype=d))
    validate_trace(out, src)
    return drop_padding(out, keep_padding=keep_padding, min_run=min_run, source=src)


_DTYPE_OK = {
    "experts": ("int8", "int16", "int32", "int64"),
    "weights": ("float16", "float32", "float64"),
}


def _check_jsonl_header(h, where: str) -> None:
    if not isinstance(h, dict):
        raise InputError(f"expected an object, got {_kind(h)}", source=where, field=_JSONL_HEADER)
    fv = h.get("format_version", FORMAT_VERSION)
    if not _int_ok(fv, 1) or fv > FORMAT_VERSION:
        raise InputError(f"expected a format version from 1 to {FORMAT_VERSION}, got {_kind(fv)}", source=where, field=f"{_JSONL_HEADER}.format_version")
    if h.get("meta") is not None and not isinstance(h["meta"], dict):
        raise InputError(f"expected an object, got {_kind(h['meta'])}", source=where, field=f"{_JSONL_HEADER}.meta")
    shape = h.get("shape")
    if shape is not None and not (isinstance(shape, list) and len(shape) == 3 and all(_int_ok(x, 1) for x in shape)):
        raise InputError(f"expected [T, L, K] positive integers, got {_kind(shape)}", source=where, field=f"{_JSONL_HEADER}.shape")
    dt = h.get("dtypes", {})
    if not isinstance(dt, dict):
        raise InputError(f"expected an object, got {_kind(dt)}", source=where, field=f"{_JSONL_HEADER}.dtypes")
    ints = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32")
    for k, v in dt.items():
        ok = _DTYPE_OK.get(k, ints if k in dict(_ROW_FIELDS) else None)
        if ok is None or v not in ok:
            raise InputError(f"unsupported dtype {_kind(v)} for {_kind(k)}", source=where, field=f"{_JSONL_HEADER}.dtypes")


# ----------------------------------------------------------------------------------------------
# per-layer lists (layer index -> list over tokens of expert ids)


def _layer_index(key, src: str) -> int:
    if _is_int(key) and key >= 0:
        return int(key)
    m = re.findall(r"\d+", key) if isinstance(key, str) else []
    if not m:
        raise InputError(f"expected a layer index (or a name containing one), got {_kind(key)}", source=src, field="layers")
    return int(m[-1])


def from_layer_lists(
    path: str | os.PathLike,
    *,
    model: str | None = None,
    num_experts: int | None = None,
    top_k: int | None = None,
    keep_padding: bool = False,
    min_run: int = PADDING_MIN_RUN,
) -> Trace:
    """Read a per-layer routing log: layer index -> list over tokens of expert-id lists.

    Accepted shapes (the form routing analyses often publish):

    * JSON object ``{"0": [[3, 5], [1, 2], ...], "1": [...]}``; keys may be names holding the
      layer index (``"layer_3"``, ``"model.layers.3.mlp.gate"``: the last number is used);
      a token entry may be a bare int (top-1);
    * the same wrapped: ``{"layers": {...}, "model": ..., "num_experts": ..., "top_k": ...}``;
    * JSONL, one layer per line: ``{"layer": 3, "experts": [[...], ...]}`` or ``{"3": [[...], ...]}``.

    Every layer must list the same number of tokens. Columns are the layers in increasing order
    (``meta['layers']``); ``K`` is ``top_k`` or the longest list (shorter lists padded with
    ``-1``); ``num_experts`` defaults to the wrapper's value, else is left out. Padding rows are
    dropped (see :func:`drop_padding`) unless ``keep_padding``.
    """
    src = str(path)
    text = _read_text(path, "a per-layer expert-list JSON file")
    stripped = text.lstrip()
    wrapper: dict = {}
    items: list[tuple[int, object, str]] = []  # (layer, token list, where)
    whole = None
    if stripped.startswith("{"):
        try:
            whole = json.loads(text)
        except (ValueError, RecursionError):
            whole = None  # maybe JSONL
    if whole is None:
        lines = [(i, ln) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]
        if not lines:
            raise InputError("is empty (expected a JSON object layer -> token expert lists)", source=src)
        for i, ln in lines:
            where = f"{src}:{i}"
            obj = _json_line(ln, where)
            if not isinstance(obj, dict):
                raise InputError(f"expected a JSON object per line, got {_kind(obj)}", source=where)
            if "layer" in obj:
                tok = obj.get("experts", obj.get("tokens"))
                items.append((_layer_index(obj["layer"], where), tok, where))
            else:
                for k, v in obj.items():
                    items.append((_layer_index(k, where), v, where))
    else:
        if not isinstance(whole, dict):
            raise InputError(f"expected a JSON object at the top, got {type(whole).__name__}", source=src)
        mapping = whole
        if isinstance(whole.get("layers"), dict):
            wrapper = {k: v for k, v in whole.items() if k != "layers"}
            mapping = whole["layers"]
        for k, v in mapping.items():
            items.append((_layer_index(k, src), v, src))
    if not items:
        raise InputError("has no layers", source=src, field="layers")
    items.sort(key=lambda x: x[0])
    layers = [x[0] for x in items]
    if len(set(layers)) != len(layers):
        dup = next(a for a, b in itertools.pairwise(layers) if a == b)
        raise InputError(f"layer {dup} appears twice", source=src, field="layers")
    n_tok = None
    K = 0
    hi = 0
    for lay, toks, where in items:
        fld = f"layers.{lay}"
        if not isinstance(toks, list) or not toks:
            raise InputError(f"expected a non-empty list over tokens of expert-id lists, got {_kind(toks)}", source=where, field=fld)
        if n_tok is None:
            n_tok = len(toks)
        elif len(toks) != n_tok:
            raise InputError(f"has {len(toks)} tokens, layer {layers[0]} has {n_tok}; every layer must list every token", source=where, field=fld)
        for t, ids in enumerate(toks):
            if _is_int(ids):
                continue
            if not isinstance(ids, list) or not all(_int_ok(x, -1) for x in ids):
                raise InputError(f"expected a list of expert ids, got {_kind(ids)}", source=where, field=f"{fld}[{t}]")
            K = max(K, len(ids))
            hi = max([hi, *ids])
        hi = max([hi, *(x for x in toks if _is_int(x))])
    K = max(K, 1)
    tk = top_k if top_k is not None else wrapper.get("top_k")
    if tk is not None:
        if not _int_ok(tk, 1) or tk < K:
            raise InputError(f"top_k {tk!r} is smaller than the longest expert list ({K})", source=src, field="top_k")
        K = int(tk)
    ne = num_experts if num_experts is not None else wrapper.get("num_experts")
    if ne is not None and not _int_ok(ne, 1):
        raise InputError(f"expected a positive integer, got {_kind(ne)}", source=src, field="num_experts")
    experts = np.full((n_tok, len(items), K), -1, dtype=np.int16 if hi < 2**15 else np.int32)
    for c, (lay, toks, _) in enumerate(items):
        for t, ids in enumerate(toks):
            if _is_int(ids):
                ids = [ids]
            experts[t, c, : len(ids)] = ids
    mdl = model if model is not None else (wrapper.get("model") if isinstance(wrapper.get("model"), str) else None)
    meta = {
        "format_version": FORMAT_VERSION,
        "top_k": K,
        "layers": layers,
        "source": f"per-layer expert lists {Path(src).name}",
    }
    if mdl is not None:
        meta["model"] = mdl
    if ne is not None:
        meta["num_experts"] = int(ne)
    out = Trace(experts=experts, meta=meta)
    validate_trace(out, src)
    return drop_padding(out, keep_padding=keep_padding, min_run=min_run, source=src)


# ----------------------------------------------------------------------------------------------
# format detection (for ``moesim trace convert``)

INPUT_FORMATS = ("router-json", "jsonl", "layer-lists", "parquet", "npz")
OUTPUT_FORMATS = ("npz", "jsonl", "parquet", "dir")


def guess_input_format(path: str | os.PathLike) -> str:
    """The input format of ``path`` from its suffix, sniffing ``.json`` / ``.jsonl`` contents.

    A directory or ``.npz`` is ``npz``; ``.parquet`` / ``.pq`` is ``parquet``; JSON with a
    ``selections`` key is ``router-json``; JSON lines whose first object has ``experts`` (or the
    moesim header) are ``jsonl``; other JSON is ``layer-lists``.
    """
    p = Path(path)
    src = str(path)
    suf = p.suffix.lower()
    if p.is_dir() or suf == ".npz":
        return "npz"
    if suf in (".parquet", ".pq"):
        return "parquet"
    if suf in (".json", ".jsonl", ".ndjson"):
        text = _read_text(path, "a JSON routing log")
        first = next((ln for ln in text.splitlines() if ln.strip()), "")
        try:
            obj = json.loads(first)
        except (ValueError, RecursionError):
            obj = None
        if isinstance(obj, dict) and (_JSONL_HEADER in obj or ("experts" in obj and "layer" not in obj)):
            return "jsonl"
        if obj is None and suf == ".json":
            try:
                whole = json.loads(text)
            except (ValueError, RecursionError) as exc:
                raise InputError(f"is not valid JSON ({_why(exc)})", source=src) from None
            if isinstance(whole, dict) and "selections" in whole:
                return "router-json"
            return "layer-lists"
        if isinstance(obj, dict) and "selections" in obj:
            return "router-json"
        return "layer-lists"
    raise InputError(
        f"cannot tell the format from the name; pass --from ({'|'.join(INPUT_FORMATS)})", source=src
    )


def guess_output_format(path: str | os.PathLike) -> str:
    """``npz`` / ``jsonl`` / ``parquet`` from the suffix; anything else is a ``dir`` of ``.npy``."""
    suf = Path(path).suffix.lower()
    return {".npz": "npz", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}.get(suf, "dir")
