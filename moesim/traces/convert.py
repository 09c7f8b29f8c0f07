"""Converters between the moesim trace format and other routing-log formats.

* RouterTrace JSON (as written by the stratamoe-lab capture tools): ``selections[t][layer]`` is the
  list of expert ids token ``t`` chose at the ``layer``-th logged MoE layer.
* Parquet long form (DESIGN 3.3): one row per (token-step, layer, rank) choice with columns
  ``request, token, step, layer, rank, expert, weight`` (+ ``row``, and ``phase`` when known).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from moesim.errors import InputError
from moesim.traces.format import FORMAT_VERSION, Trace, _is_int, _why, validate_trace

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
        _META_KEY: json.dumps(meta, sort_keys=True, default=_np_json).encode(),
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


def _np_json(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


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
