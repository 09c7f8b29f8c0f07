"""The ``attention`` measure part on the CPU at tiny shapes: one row per (shape, batch, context), the
medians-with-spread layout, the op it times, and the command-line part name."""

from __future__ import annotations

import json

import pytest

from moesim.cli import main
from validate.measure import PARTS, QUICK_ATTN_SHAPES, dense_block, run_measure, sizes

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("attn")
    res = run_measure(out, ["attention"], "cpu", quick=True, log=lambda *a: None)
    return out, res, json.loads((out / "attention.json").read_text())


def test_rows_cover_shapes_batches_contexts(measured):
    _, res, data = measured
    sz = sizes(True)
    want = {(s, b, c) for s in QUICK_ATTN_SHAPES for b in sz.attn_batches for c in sz.attn_contexts}
    assert {(r["shape"], r["batch"], r["context"]) for r in data["rows"]} == want
    for r in data["rows"]:
        for key in ("graph_us", "eager_us"):
            st = r[key]
            assert st["min"] <= st["p10"] <= st["median"] <= st["p90"] <= st["max"] and st["median"] > 0
        h, heads, kvh, d, E = QUICK_ATTN_SHAPES[r["shape"]]
        assert r["kv_bytes"] == 2 * r["batch"] * kvh * r["context"] * d * 4  # fp32 on the CPU
        assert 1 <= r["nrot"] <= sz.attn_max_rot
    assert data["device"] == "cpu" and data["dtype"] == "float32"
    assert data["_meta"]["smoke"] is True and data["_meta"]["part"] == "attention"
    assert "attention" in PARTS and not res["skipped"][1:]  # only the env GEMM is skipped on the CPU


def test_dense_block_routes_like_a_reference():
    h, heads, kvh, d, E = QUICK_ATTN_SHAPES["tiny"]
    g = torch.Generator().manual_seed(0)
    W = {k: torch.randn(*s, generator=g) for k, s in (("q", (h, heads * d)), ("k", (h, kvh * d)), ("v", (h, kvh * d)),
                                                       ("o", (heads * d, h)), ("r", (h, E)))}
    W["n1"] = W["n2"] = torch.ones(h)
    x = torch.randn(3, h, generator=g)
    kc, vc = torch.randn(3, kvh, 10, d, generator=g), torch.randn(3, kvh, 10, d, generator=g)
    vals, idx = dense_block(torch, x, kc.clone(), vc.clone(), W, heads, kvh, d)
    # reference: explicit attention per head with the new token's K/V in the last slot
    F = torch.nn.functional
    y = F.rms_norm(x, (h,), W["n1"])
    q = (y @ W["q"]).view(3, heads, d)
    k, v = kc.clone(), vc.clone()
    k[:, :, -1], v[:, :, -1] = (y @ W["k"]).view(3, kvh, d), (y @ W["v"]).view(3, kvh, d)
    k, v = k.repeat_interleave(heads // kvh, dim=1), v.repeat_interleave(heads // kvh, dim=1)
    att = torch.softmax(torch.einsum("bhd,bhcd->bhc", q, k) / d**0.5, -1)
    out = x + torch.einsum("bhc,bhcd->bhd", att, v).reshape(3, heads * d) @ W["o"]
    ref = torch.topk(torch.softmax(F.rms_norm(out, (h,), W["n2"]) @ W["r"], -1), 2, dim=-1)
    assert torch.equal(idx, ref.indices) and torch.allclose(vals, ref.values, atol=1e-5)


def test_cli_part_name(tmp_path, capsys):
    assert main(["validate", "measure", "--device", "cpu", "--quick", "--parts", "attention",
                 "--out", str(tmp_path / "m")]) == 0
    assert "attention  4 rows" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"env.json", "attention.json"}
