"""Fitted trace synthesis (issue 5, item 4): ``fit_profile`` + ``synthesize_from_profile``.

A profile fitted to the bundled real ``traces/switch-base-8.npz`` (215 tokens x 6 layers, top-1 of
8) generates 20,000 tokens whose statistics reproduce the fitted ones within these tolerances, per
layer column (statistics as computed by :func:`moesim.traces.stats.trace_statistics`):

* expert popularity: total variation distance between the real and synthetic per-layer popularity
  distributions < 0.05;
* temporal reuse rate (row shares an expert with the previous row): absolute difference < 0.03;
* cross-layer transition predictability (share of layer-(l+1) choices guessed by the best map from
  the layer-l choice), per consecutive layer pair: absolute difference < 0.05.

Also: seeded determinism, the profile's JSON round trip, and the CLI (``trace synth --fit``).
What the generator does not capture is listed in ``synthesize_from_profile``'s docstring.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from moesim.cli import main
from moesim.errors import InputError
from moesim.traces import fit_profile, load_trace, synthesize_from_profile, validate_trace
from moesim.traces.stats import trace_statistics
from tests.conftest import ROOT

SWITCH = ROOT / "traces" / "switch-base-8.npz"
TV_TOL, REUSE_TOL, PRED_TOL = 0.05, 0.03, 0.05


@pytest.fixture(scope="module")
def real():
    return load_trace(SWITCH)


@pytest.fixture(scope="module")
def profile(real):
    return fit_profile(real)


def _stats(tr):
    return trace_statistics(tr, windows=(), capacities=[])


def _shares(st):
    p = np.asarray(st["popularity"], dtype=np.float64)
    return p / p.sum(axis=1, keepdims=True)


def test_profile_shape_and_source(real, profile):
    assert profile["num_experts"] == 8 and profile["top_k"] == 1
    assert profile["layers"] == [1, 3, 5, 7, 9, 11]
    assert profile["source"]["sha256"] == real.sha256
    assert profile["source"]["source"] == real.meta["source"]
    assert len(profile["transitions"]) == 5
    np.testing.assert_allclose(np.asarray(profile["transitions"]).sum(axis=2), 1.0)
    np.testing.assert_allclose(np.asarray(profile["popularity"]).sum(axis=1), 1.0)


def test_synthetic_reproduces_fitted_statistics(real, profile):
    syn = synthesize_from_profile(profile, num_tokens=20_000, seed=1)
    validate_trace(syn)
    assert syn.experts.shape == (20_000, 6, 1)
    a, b = _stats(real), _stats(syn)
    tv = 0.5 * np.abs(_shares(a) - _shares(b)).sum(axis=1)
    assert tv.max() < TV_TOL, tv
    reuse = np.abs(np.asarray(a["reuse_rate"]) - np.asarray(b["reuse_rate"]))
    assert reuse.max() < REUSE_TOL, reuse
    pred = np.abs([x["predictability"] - y["predictability"] for x, y in zip(a["transitions"], b["transitions"])])
    assert pred.max() < PRED_TOL, pred
    # the transitions carry information: predictability well above the no-information baseline
    assert all(y["predictability"] > y["baseline"] + 0.1 for y in b["transitions"])
    assert syn.meta["synthetic"]["profile_source"]["sha256"] == real.sha256
    assert real.sha256[:16] in syn.meta["source"]


def test_seeded_determinism(profile):
    a = synthesize_from_profile(profile, num_tokens=500, seed=3)
    b = synthesize_from_profile(profile, num_tokens=500, seed=3)
    np.testing.assert_array_equal(a.experts, b.experts)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert a.meta == b.meta
    assert not np.array_equal(synthesize_from_profile(profile, num_tokens=500, seed=4).experts, a.experts)


def test_fit_is_deterministic_and_json_round_trips(real, profile, tmp_path):
    assert fit_profile(real) == profile
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile), encoding="utf-8")
    back = json.loads(path.read_text(encoding="utf-8"))
    assert back == profile
    a = synthesize_from_profile(back, num_tokens=300, seed=0)
    b = synthesize_from_profile(profile, num_tokens=300, seed=0)
    np.testing.assert_array_equal(a.experts, b.experts)


def test_top_k_with_weights_runs():
    tr = load_trace(ROOT / "traces" / "mixtral-8x7b-synth.npz")
    from moesim.traces import Trace

    small = Trace(experts=np.asarray(tr.experts[:1000, :4]), weights=np.asarray(tr.weights[:1000, :4]),
                  meta={**tr.meta, "layers": [0, 1, 2, 3]})
    p = fit_profile(small)
    assert p["gate_mean"] is not None and p["gate_mean"][0] >= p["gate_mean"][1]
    syn = synthesize_from_profile(p, num_tokens=2000, seed=0)
    validate_trace(syn)
    assert (np.sort(syn.experts, axis=2)[:, :, 0] != np.sort(syn.experts, axis=2)[:, :, 1]).all()
    np.testing.assert_allclose(syn.weights.astype(np.float64).sum(axis=2), 1.0, atol=2e-3)


def test_bad_profile(profile):
    with pytest.raises(InputError):
        synthesize_from_profile({**profile, "popularity": [[1.0]]}, num_tokens=10, seed=0)
    with pytest.raises(InputError):
        synthesize_from_profile(profile, num_tokens=0, seed=0)


def test_cli_synth_fit(tmp_path, capsys):
    dst, pj = tmp_path / "fit.npz", tmp_path / "profile.json"
    assert main(["trace", "synth", str(dst), "--fit", str(SWITCH), "--tokens", "256", "--seed", "2",
                 "--profile-out", str(pj)]) == 0
    tr = load_trace(dst)
    assert tr.experts.shape == (256, 6, 1)
    assert json.loads(pj.read_text())["source"]["sha256"] == load_trace(SWITCH).sha256
    assert main(["trace", "synth", str(tmp_path / "x.npz")]) != 0
