"""Regenerate the bundled traces in this folder (see README.md here for what each file is).

    python traces/make_bundled.py [SHARED_TRACES_DIR]

SHARED_TRACES_DIR holds ``switch-base-8/router-trace.v2.json`` and its ``LICENSE``; the default is
``traces/raw`` (the bundled copy of ``../shared/traces``). Both outputs are byte-for-byte reproducible:
the .npz writer uses fixed zip timestamps and the synthetic generator is seeded.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from moesim.traces import (  # noqa: E402
    fit_profile,
    from_router_trace_json,
    load_trace,
    save_trace,
    synthesize,
    synthesize_from_profile,
)

#: Parameters of the bundled synthetic Mixtral-8x7B trace.
MIXTRAL_SYNTH = dict(
    num_tokens=4096,
    layers=list(range(32)),
    num_experts=8,
    top_k=2,
    zipf_s=0.8,
    reuse_prob=0.1,
    seed=0,
    model_name="mixtral-8x7b",
)

#: Rows and seed of the bundled synthetic trace fitted to the real switch-base-8 trace.
SWITCH_FIT_SYNTH = {"num_tokens": 4096, "seed": 0}

SWITCH_SOURCE = (
    "GitHub repository Labeeb2339/stratamoe-lab, file evidence/switch-base-8/router-trace.v2.json "
    "(RouterTrace v2, scenario 'domain-shift'), converted with "
    "moesim.traces.from_router_trace_json"
)
SWITCH_NOTE = (
    "encoder only: top-1 expert of 215 token positions at the 6 sparse encoder layers "
    "(blocks 1, 3, 5, 7, 9, 11) of google/switch-base-8, captured on CPU in float32 from ten "
    "prompts; prompt boundaries are not recorded in the file"
)
MIXTRAL_ASSUMPTIONS = (
    "synthetic, not measured: Zipf popularity exponent 0.8 and per-rank temporal reuse probability "
    "0.1 are assumptions; they give a consecutive-token repeat of the first-choice expert of about a "
    "quarter and rows sharing an expert with the previous row about two thirds of the time, i.e. "
    "reuse above chance but far from always, the kind of locality reported for Mixtral's routing; "
    "use a captured trace for quantitative conclusions"
)


def make_switch(shared: Path, out: Path = HERE) -> Path:
    """Convert the shared switch-base-8 RouterTrace JSON and copy its licence beside it."""
    src = shared / "switch-base-8" / "router-trace.v2.json"
    tr = from_router_trace_json(
        src, model="google/switch-base-8", layers=[1, 3, 5, 7, 9, 11], source=SWITCH_SOURCE, licence="Apache-2.0"
    )
    tr.meta["captured_with"] = f"{tr.meta['captured_with']}; {SWITCH_NOTE}"
    dst = save_trace(tr, out / "switch-base-8.npz")
    shutil.copyfile(shared / "switch-base-8" / "LICENSE", out / "switch-base-8.LICENSE")
    return dst


def make_mixtral(out: Path = HERE) -> Path:
    """Write the seeded synthetic Mixtral-8x7B trace."""
    tr = synthesize(**MIXTRAL_SYNTH)
    tr.meta["assumptions"] = MIXTRAL_ASSUMPTIONS
    return save_trace(tr, out / "mixtral-8x7b-synth.npz")


def make_switch_fit(switch_npz: Path, out: Path = HERE) -> Path:
    """Write a synthetic trace fitted (fit_profile) to the converted switch-base-8 trace."""
    tr = synthesize_from_profile(fit_profile(load_trace(switch_npz)), **SWITCH_FIT_SYNTH)
    return save_trace(tr, out / "switch-base-8-fit-synth.npz")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shared", nargs="?", default=None, help="folder with switch-base-8/ (default traces/raw, the bundled copy of ../shared/traces)")
    ap.add_argument("--out", default=str(HERE), help="output folder (default: this folder)")
    args = ap.parse_args(argv)
    shared = Path(args.shared) if args.shared else (HERE / "raw")
    out = Path(args.out)
    switch = make_switch(shared, out)
    for p in (switch, make_mixtral(out), make_switch_fit(switch, out)):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
