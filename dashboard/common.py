"""Shared pieces of the dashboard: where the bundled scenarios and traces are, safe loading of
uploaded scenarios and traces, the cached simulation runs, key figures.

Everything that touches user input raises :class:`moesim.errors.InputError` (one line); the pages
show it with ``st.error`` and never let a traceback through.
"""

from __future__ import annotations

import copy
import hashlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

from moesim.errors import InputError

# ----- where things are ------------------------------------------------------------------------


def _find_root() -> Path:
    """The folder holding the bundled ``scenarios/`` and ``traces/``: ``$MOESIM_DASHBOARD_ROOT``,
    else the checkout this package sits in, else ``<prefix>/share/moesim`` of a regular install,
    else the current directory."""
    env = os.environ.get("MOESIM_DASHBOARD_ROOT")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve().parent.parent
    if (here / "scenarios").is_dir():
        return here
    shared = Path(sys.prefix) / "share" / "moesim"
    if (shared / "scenarios").is_dir():
        return shared
    return Path.cwd().resolve()


ROOT = _find_root()
SCENARIOS_DIR = (ROOT / "scenarios").resolve()
TRACES_DIR = (ROOT / "traces").resolve()
VALIDATE_DIR = (ROOT / "validate").resolve()
UPLOAD_DIR = Path(tempfile.gettempdir()) / "moesim-dashboard-uploads"

MAX_YAML_UPLOAD_BYTES = 256 * 1024
MAX_TRACE_UPLOAD_BYTES = 64 * 2**20
DEFAULT_SCENARIO = "mixtral-8x7b-h100-lru-c96"
DEFAULT_MAX_TOKENS = 256  # the dashboard's token cap by default: a run answers in well under 2 s
HARD_MAX_TOKENS = 8192  # the cap can be raised up to this, never beyond
MIN_MAX_TOKENS = 64
UPLOAD_SOURCE = "uploaded scenario"


SINGLE_GPU_CLASSES = ("single", "serving", "throughput")  # scenario_class values of one-GPU runs


def bundled_scenarios() -> list[str]:
    """Names (file stems) of the single-GPU scenarios in ``scenarios/`` (not its ``presets/``).

    Multi-GPU scenarios (a ``cluster:`` block, here or in an included file) are left out: the
    What-if, Timeline, Curves and Compare pages are built around one GPU and its expert cache; the
    Cluster and Serving pages list those (:func:`bundled_of_class`)."""
    if not SCENARIOS_DIR.is_dir():
        return []
    return sorted(p.stem for p in SCENARIOS_DIR.glob("*.yaml") if p.is_file() and not _multi_gpu(p))


def _multi_gpu(path: Path) -> bool:
    return scenario_class_of(path) in ("cluster", "cluster-serving")


_CLASS_MEMO: dict = {}


def scenario_class(raw: dict) -> str:
    """What kind of run a merged raw scenario is: ``single`` (single-GPU decode), ``serving``
    (single GPU, ``workload.requests``), ``throughput`` (MoE-Lightning / Klotski / MoE-Gen engine),
    ``cluster`` (expert-parallel decode) or ``cluster-serving`` (requests on a cluster: co-located,
    attention-FFN or prefill/decode disaggregated)."""
    from moesim.policies.base import registry

    wl = raw.get("workload")
    serving = isinstance(wl, dict) and wl.get("requests") is not None
    if raw.get("cluster") is not None:
        return "cluster-serving" if serving else "cluster"
    if serving:
        return "serving"
    pol = raw.get("policies")
    ex = pol.get("execution") if isinstance(pol, dict) else None
    kind = ex.get("kind") if isinstance(ex, dict) else None
    cls = registry("execution").get(kind) if isinstance(kind, str) else None
    return "throughput" if getattr(cls, "throughput_engine", False) else "single"


def scenario_class_of(path: Path) -> str | None:
    """:func:`scenario_class` of a scenario file (memoised by modification time); None when the
    file does not load (it shows its error when chosen)."""
    from moesim.config.loader import load_raw

    try:
        key = (str(path), path.stat().st_mtime_ns)
    except OSError:
        return None
    if key not in _CLASS_MEMO:
        try:
            _CLASS_MEMO[key] = scenario_class(load_raw(path))
        except Exception:
            _CLASS_MEMO[key] = None
    return _CLASS_MEMO[key]


def bundled_of_class(*classes: str) -> list[str]:
    """Names of the bundled scenarios of the given :func:`scenario_class` values."""
    if not SCENARIOS_DIR.is_dir():
        return []
    return sorted(p.stem for p in SCENARIOS_DIR.glob("*.yaml") if p.is_file() and scenario_class_of(p) in classes)


def bundled_traces() -> list[str]:
    """File names of the ``.npz`` traces in ``traces/``."""
    if not TRACES_DIR.is_dir():
        return []
    return sorted(p.name for p in TRACES_DIR.glob("*.npz") if p.is_file())


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def load_bundled(name: str) -> dict:
    """The merged raw mapping of bundled scenario ``name`` (includes resolved, trace path absolute)."""
    from moesim.config.loader import load_raw

    if name not in {p.stem for p in SCENARIOS_DIR.glob("*.yaml") if p.is_file()}:  # any page's bundled list
        raise InputError(f"unknown bundled scenario {name!r}", source="scenarios/")
    raw = load_raw(SCENARIOS_DIR / f"{name}.yaml")
    raw.setdefault("name", name)
    return raw


# ----- uploads ----------------------------------------------------------------------------------


def parse_uploaded_yaml(data: bytes, filename: str = "upload.yaml") -> dict:
    """The merged raw mapping of an uploaded scenario file, read as if it sat in ``scenarios/``.

    Safe loader and size limit as the CLI; its ``include:`` files must lie inside the bundled
    ``scenarios/`` and its ``trace.path`` inside the bundled ``traces/`` (anything else, absolute or
    through ``..``, is refused with one line)."""
    from moesim.config.loader import load_raw, merge_scenarios

    src = f"{UPLOAD_SOURCE} {filename}"
    if len(data) > MAX_YAML_UPLOAD_BYTES:
        raise InputError(f"file larger than {MAX_YAML_UPLOAD_BYTES} bytes", source=src)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError("not a UTF-8 text file", source=src) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise InputError(f"{where}{getattr(exc, 'problem', None) or 'invalid YAML'}", source=src) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise InputError("expected a mapping with string keys at the top level", source=src)
    trace = raw.get("trace")
    if isinstance(trace, dict) and trace.get("path") is not None:
        if not isinstance(trace["path"], str):
            raise InputError("expected a file path", source=src, field="trace.path")
        trace["path"] = str(confine_trace_path(trace["path"], base=SCENARIOS_DIR, source=src))
    includes = raw.pop("include", None)
    if includes is None:
        merged = raw
    else:
        if isinstance(includes, str):
            includes = [includes]
        if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
            raise InputError("expected a list of file paths", source=src, field="include")
        merged = {}
        for inc in includes:
            p = Path(inc).expanduser()
            p = (p if p.is_absolute() else SCENARIOS_DIR / p).resolve()
            if not _inside(p, SCENARIOS_DIR):
                raise InputError(
                    f"include {inc!r} is outside the bundled scenarios/ folder; only bundled files can be included",
                    source=src, field="include")
            if not p.is_file():
                raise InputError(f"included file {inc!r} not found in scenarios/", source=src, field="include")
            merged = merge_scenarios(merged, load_raw(p))
        merged = merge_scenarios(merged, raw)
    check_trace_allowed(merged, source=src)
    merged.setdefault("name", Path(filename).stem or "uploaded")
    return merged


def confine_trace_path(path: str, *, base: Path, source: str, extra_allowed: tuple = ()) -> Path:
    """``path`` (relative to ``base``) resolved; refused unless inside ``traces/`` (or one of
    ``extra_allowed`` exact files)."""
    p = Path(path).expanduser()
    p = (p if p.is_absolute() else base / p).resolve()
    if _inside(p, TRACES_DIR) or any(p == Path(a).resolve() for a in extra_allowed):
        return p
    raise InputError(f"trace path {path!r} is outside the bundled traces/ folder; upload the trace instead",
                     source=source, field="trace.path")


def check_trace_allowed(raw: dict, *, source: str, extra_allowed: tuple = ()) -> None:
    """Refuse a merged scenario whose ``trace.path`` or request-arrival file
    (``workload.requests.arrival.path``) leaves ``traces/``."""
    trace = raw.get("trace")
    if isinstance(trace, dict) and isinstance(trace.get("path"), str):
        confine_trace_path(trace["path"], base=SCENARIOS_DIR, source=source, extra_allowed=extra_allowed)
    wl = raw.get("workload")
    req = wl.get("requests") if isinstance(wl, dict) else None
    arr = req.get("arrival") if isinstance(req, dict) else None
    if isinstance(arr, dict) and arr.get("path") is not None:
        if not isinstance(arr["path"], str) or not _inside(
                (SCENARIOS_DIR / Path(arr["path"]).expanduser()).resolve(), TRACES_DIR):
            raise InputError(f"arrival file {arr['path']!r} is outside the bundled traces/ folder",
                             source=source, field="workload.requests.arrival.path")


def save_uploaded_trace(data: bytes, filename: str = "trace.npz") -> Path:
    """Store an uploaded ``.npz`` trace under a content-addressed name and check it with the
    trace toolkit's loader (InputError on a bad file)."""
    from moesim.traces import load_trace

    src = f"uploaded trace {filename}"
    if len(data) > MAX_TRACE_UPLOAD_BYTES:
        raise InputError(f"file larger than {MAX_TRACE_UPLOAD_BYTES // 2**20} MiB", source=src)
    if not filename.endswith(".npz"):
        raise InputError("expected a .npz trace file", source=src)
    UPLOAD_DIR.mkdir(parents=True, exist_ok=True)
    dst = UPLOAD_DIR / (hashlib.sha256(data).hexdigest()[:32] + ".npz")
    if not dst.exists():
        tmp = dst.with_suffix(".tmp%d" % os.getpid())
        tmp.write_bytes(data)
        os.replace(tmp, dst)
    try:
        load_trace(dst)
    except InputError as e:
        raise InputError(e.message, source=src, field=e.field) from None
    except Exception as exc:  # a corrupt archive: numpy/zipfile errors
        raise InputError(f"unreadable trace ({type(exc).__name__})", source=src) from None
    return dst


# ----- scenarios: edit, validate, hash ----------------------------------------------------------


def validate_raw(raw: dict, source: str = "dashboard"):
    """The validated Scenario model of a raw mapping (presets expanded), or InputError."""
    from moesim.config.loader import scenario_from_dict

    return scenario_from_dict(raw, source=source, base_dir=SCENARIOS_DIR)


def with_token_cap(raw: dict, max_tokens: int) -> dict:
    """``raw`` with ``workload.max_tokens`` at most ``max_tokens`` (and warm-up below it)."""
    out = copy.deepcopy(raw)
    wl = out.setdefault("workload", {})
    if not isinstance(wl, dict):
        return out
    cur = wl.get("max_tokens")
    cap = int(max_tokens)
    wl["max_tokens"] = cap if not isinstance(cur, int) else min(cur, cap)
    warm = wl.get("warmup_tokens", 32)
    if isinstance(warm, int) and warm >= wl["max_tokens"]:
        wl["warmup_tokens"] = wl["max_tokens"] // 4
    return out


DEFAULT_CLUSTER_STEPS = 4  # measured decode steps of a multi-GPU run on the Cluster page
HARD_MAX_CLUSTER_STEPS = 64
DEFAULT_MAX_REQUESTS = 48  # requests of a run on the Serving page
HARD_MAX_REQUESTS = 2000


def cluster_rows_per_step(sc) -> tuple[int, int]:
    """Trace rows one decode step of expert-parallel scenario ``sc`` consumes, before and after an
    elastic change (data-parallel attention ranks x ``workload.batch_size``; the same rule as
    ``moesim.engine.build_ep``)."""
    par, B = sc.parallel, sc.workload.batch_size
    t = par.attention_tp
    ranks = (par.attention_gpus or sc.cluster.num_gpus) // t
    el = par.elastic
    if el is None:
        return ranks * B, ranks * B
    end = el.end_gpus or sc.cluster.num_gpus
    before = (el.start_gpus // t) * B
    return before, (end // t) * B if end > el.start_gpus else before


def with_step_cap(raw: dict, sc, steps: int) -> dict:
    """``raw`` (validated as ``sc``, a multi-GPU decode scenario) with at most ``steps`` measured
    decode steps: ``workload.max_tokens`` cut to (warm-up steps + ``steps``) steps' rows, never
    raised. An elastic run keeps at least two steps after its change."""
    out = copy.deepcopy(raw)
    wl = out.setdefault("workload", {})
    if not isinstance(wl, dict):
        return out
    R, R_after = cluster_rows_per_step(sc)
    warm = sc.workload.warmup_tokens // R
    total = warm + max(1, int(steps))
    el = sc.parallel.elastic
    if el is None:
        rows = total * R
    else:
        total = max(total, el.at_step + 2)
        rows = el.at_step * R + (total - el.at_step) * R_after
    wl["max_tokens"] = min(int(sc.workload.max_tokens), rows)
    return out


def with_request_cap(raw: dict, n: int) -> dict:
    """``raw`` (a serving scenario) with at most ``n`` requests (``workload.requests.num_requests``;
    an arrival process bounded only by ``duration_s`` gets the cap as well, whichever ends first)."""
    out = copy.deepcopy(raw)
    wl = out.get("workload")
    req = wl.get("requests") if isinstance(wl, dict) else None
    if not isinstance(req, dict):
        return out
    cur = req.get("num_requests")
    req["num_requests"] = int(n) if not isinstance(cur, int) or isinstance(cur, bool) else min(cur, int(n))
    warm = req.get("warmup_requests")
    if isinstance(warm, int) and warm >= req["num_requests"]:
        req["warmup_requests"] = req["num_requests"] // 4
    return out


def trace_sha(path: str) -> str:
    from moesim.traces import trace_sha256

    st_ = os.stat(path)
    return _trace_sha_cached(str(path), st_.st_mtime_ns, st_.st_size, trace_sha256)


_SHA_MEMO: dict = {}


def _trace_sha_cached(path, mtime, size, fn):
    key = (path, mtime, size)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = fn(path)
    return _SHA_MEMO[key]


def scenario_key(sc) -> str:
    """The run's scenario hash (moesim.config.loader.scenario_hash) as the cache key."""
    from moesim.config.loader import scenario_hash

    tp = sc.trace.path
    return scenario_hash(sc, trace_sha(tp) if tp else None)


def policy_fields(family: str, kind: str) -> dict:
    """Simple editable fields of a policy kind: name -> (type, default, choices)."""
    import typing

    from moesim.policies.base import registry

    cls = registry(family).get(kind)
    out = {}
    if cls is None:
        return out
    for name, fi in cls.Config.model_fields.items():
        if name in ("kind", "capacity_experts", "capacity_gib", "warm_start"):
            continue
        ann = fi.annotation
        if ann in (int, float, bool):
            out[name] = (ann, fi.default, None)
        elif typing.get_origin(ann) is typing.Literal:
            out[name] = (str, fi.default, list(typing.get_args(ann)))
    return out


def has_capacity(kind: str) -> bool:
    from moesim.policies.base import registry

    cls = registry("cache").get(kind)
    return cls is not None and "capacity_experts" in cls.Config.model_fields


# ----- runs ---------------------------------------------------------------------------------------


def _slim(out, timeline: bool) -> dict:
    """What a page needs of a RunOutput (picklable for st.cache_data)."""
    import pandas as pd

    from moesim.engine.single_gpu import TIMELINE_COLUMNS
    from moesim.metrics.summary import step_latencies_s

    res = out.result
    has_steps = hasattr(res, "step_end_s")  # serving on a cluster has request-level results only
    d = {
        "summary": out.summary,
        "lat_ms": step_latencies_s(res) * 1e3 if has_steps else np.zeros(0),
        "warmup_steps": int(getattr(res, "warmup_steps", 0)),
        "notes": list(getattr(out.prepared, "notes", None) or []),
        "timeline": None,
        "requests": None if getattr(out, "requests", None) is None else out.requests.to_pandas(),
    }
    if timeline:
        rows = res.timeline or []
        df = pd.DataFrame.from_records(rows, columns=list(TIMELINE_COLUMNS))
        for c in ("resource", "kind"):
            df[c] = df[c].astype("category")
        d["timeline"] = df
    return d


def simulate_slim(sc, *, timeline: bool = False, progress=None) -> dict:
    from moesim.engine.run import simulate

    return _slim(simulate(sc, source="dashboard", record_timeline=timeline, progress=progress), timeline)


def key_figures(s: dict) -> dict:
    """The headline numbers of a summary.json (None where not applicable)."""
    u = s.get("utilization", {})
    hr = s["cache"]["hit_rate"]
    tp = s.get("tpot_ms") or {}
    return {
        "TPOT p50 (ms)": tp.get("p50"),
        "TPOT p99 (ms)": tp.get("p99"),
        "TPOT mean (ms)": tp.get("mean"),
        "throughput (tok/s)": s["throughput_tok_s"],
        "hit rate (%)": None if hr is None else 100 * hr,
        "GB host->GPU": s["transfers"]["bytes_h2d"] / 1e9,
        "GPU compute util (%)": 100 * u.get("gpu0.compute", 0.0),
        "copy engine util (%)": 100 * u.get("gpu0.h2d", 0.0),
        "CPU util (%)": 100 * u.get("cpu0", 0.0),
    }


_THROUGHPUT_MEASURES = {"system", "sequences", "decode_steps", "warmup_steps", "tokens_per_step", "step_time_ms",
                        "step_time_per_token_ms", "bytes_h2d_per_token", "bytes_d2h_per_token", "kv_cache_bytes",
                        "hrm", "policy"}


def throughput_policy(tp: dict) -> str:
    """The policy a throughput-engine system ran with, as one line: the ``throughput`` block's
    ``policy`` mapping (MoE-Lightning's HRM choice) and its other scalar settings (Klotski's batches,
    MoE-Gen's module batch sizes, ...)."""
    items = dict(tp.get("policy") or {})
    for k, v in tp.items():
        if k not in _THROUGHPUT_MEASURES and not isinstance(v, (dict, list)) and v is not None:
            items[k] = v
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items.items())


def throughput_figures(s: dict) -> dict | None:
    """The ``throughput`` block of a throughput-engine summary (MoE-Lightning, Klotski, MoE-Gen) as
    a row of a table; None for other runs."""
    tp = s.get("throughput")
    if not isinstance(tp, dict):
        return None
    hrm = tp.get("hrm") or {}
    return {
        "system": tp.get("system"),
        "tokens/s": s.get("throughput_tok_s"),
        "sequences per step": tp.get("sequences"),
        "step time (s)": None if tp.get("step_time_ms") is None else tp["step_time_ms"] / 1e3,
        "MB host->GPU per token": None if tp.get("bytes_h2d_per_token") is None else tp["bytes_h2d_per_token"] / 1e6,
        "chosen policy": throughput_policy(tp),
        "model estimate (tok/s)": hrm.get("throughput_tok_s"),
        "estimate bound by": hrm.get("bound"),
    }


def throughput_table(rows: dict):
    """A table of :func:`throughput_figures` rows (label -> figures; None = not a
    throughput-engine run, shown as n/a)."""
    import pandas as pd

    keys = next(v for v in rows.values() if v)
    return pd.DataFrame({lab: (v or {k: None for k in keys}) for lab, v in rows.items()}).T.astype(object)


def cluster_figures(s: dict) -> dict:
    """The headline numbers of an expert-parallel decode summary (its ``expert_parallel`` block)."""
    ep = s["expert_parallel"]
    imb, a2a, tr = ep.get("imbalance") or {}, ep.get("alltoall") or {}, ep.get("traffic") or {}
    tp = s.get("tpot_ms") or {}
    return {
        "TPOT mean (ms)": tp.get("mean"),
        "TPOT p99 (ms)": tp.get("p99"),
        "throughput (tok/s)": s.get("throughput_tok_s"),
        "tok/s per GPU": (ep.get("efficiency") or {}).get("tokens_per_s_per_gpu"),
        "layer load max/mean": imb.get("expert_tokens_max_over_mean"),
        "busy max/mean": imb.get("busy_max_over_mean"),
        "all-to-all (ms)": (a2a.get("dispatch_ms") or 0.0) + (a2a.get("combine_ms") or 0.0),
        "GB between nodes": (tr.get("inter_node_bytes") or 0.0) / 1e9,
        "GB inside nodes": (tr.get("intra_node_bytes") or 0.0) / 1e9,
        "all-to-all hidden (ms)": ep.get("alltoall_hidden_ms"),
    }


CLUSTER_LOWER_IS_BETTER = {"TPOT mean (ms)", "TPOT p99 (ms)", "layer load max/mean", "busy max/mean",
                           "all-to-all (ms)", "GB between nodes", "GB inside nodes"}


def serving_figures(s: dict) -> dict:
    """The headline numbers of a serving summary (single GPU, co-located or disaggregated cluster)."""
    sv = s.get("serving") or {}
    slo = sv.get("slo_attainment", sv.get("slo_met_share"))

    def p(block, q):
        b = s.get(block) or {}
        return b.get(q)

    return {
        "TTFT p50 (ms)": p("ttft_ms", "p50"),
        "TTFT p99 (ms)": p("ttft_ms", "p99"),
        "TPOT p50 (ms)": p("tpot_ms", "p50"),
        "TPOT p99 (ms)": p("tpot_ms", "p99"),
        "e2e p50 (ms)": p("e2e_ms", "p50"),
        "e2e p99 (ms)": p("e2e_ms", "p99"),
        "throughput (tok/s)": s.get("throughput_tok_s"),
        "goodput (req/s)": sv.get("goodput_req_s"),
        "SLO attainment (%)": None if slo is None else 100 * slo,
        "finished requests": sv.get("finished_requests", s.get("requests")),
    }


SERVING_LOWER_IS_BETTER = {"TTFT p50 (ms)", "TTFT p99 (ms)", "TPOT p50 (ms)", "TPOT p99 (ms)", "e2e p50 (ms)",
                           "e2e p99 (ms)"}


def request_frame(df, warmup_requests: int = 0):
    """A run's per-request table (``requests.parquet``) in one shape for every serving engine:
    columns ``arrival_s, start_s`` (first scheduled / prefill start), ``first_token_s, finish_s,
    output_tokens, ttft_ms, tpot_ms, e2e_ms, queue_ms, measured`` (ms derived from the times where the
    engine does not write them: the P/D engine). Times in seconds of simulated time."""
    import pandas as pd

    d = pd.DataFrame({
        "request": df["request"].to_numpy(),
        "arrival_s": df["arrival_s"].to_numpy(float),
        "start_s": df["first_scheduled_s" if "first_scheduled_s" in df else "prefill_start_s"].to_numpy(float),
        "first_token_s": df["first_token_s"].to_numpy(float),
        "finish_s": df["finish_s"].to_numpy(float),
        "output_tokens": df["output_tokens"].to_numpy(int),
    })
    done = d["finish_s"] >= 0
    for col, (a, b) in {"ttft_ms": ("arrival_s", "first_token_s"), "e2e_ms": ("arrival_s", "finish_s"),
                        "queue_ms": ("arrival_s", "start_s")}.items():
        d[col] = df[col].to_numpy(float) if col in df else np.where(done, (d[b] - d[a]) * 1e3, np.nan)
    if "tpot_ms" in df:
        d["tpot_ms"] = df["tpot_ms"].to_numpy(float)
    else:
        n = d["output_tokens"].to_numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            d["tpot_ms"] = np.where(done & (n > 1), (d["finish_s"] - d["first_token_s"]) * 1e3 / (n - 1), np.nan)
    d["measured"] = df["measured"].to_numpy(bool) if "measured" in df else (
        (d["request"] >= warmup_requests) & done).to_numpy()
    return d


def in_system(d, grid) -> tuple:
    """Requests waiting (arrived, not yet scheduled) and running (scheduled, not finished) at the
    times ``grid`` (seconds), from :func:`request_frame`'s table."""
    t = np.asarray(grid, dtype=float)[:, None]
    fin = np.where(d["finish_s"].to_numpy() >= 0, d["finish_s"].to_numpy(), np.inf)[None, :]
    arr, start = d["arrival_s"].to_numpy()[None, :], d["start_s"].to_numpy()[None, :]
    start = np.where(start >= 0, start, np.inf)
    waiting = ((arr <= t) & (t < start)).sum(axis=1)
    running = ((start <= t) & (t < fin)).sum(axis=1)
    return waiting, running


LOWER_IS_BETTER = {"TPOT p50 (ms)", "TPOT p99 (ms)", "TPOT mean (ms)", "GB host->GPU"}


def to_yaml(raw: dict) -> str:
    return yaml.safe_dump(raw, sort_keys=False, default_flow_style=None)


def np_float(x) -> float | None:
    return None if x is None else float(np.asarray(x))
