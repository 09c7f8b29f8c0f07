"""llama.cpp -ot (override_tensors): routed-expert tensors placed by regular expression on GGUF
tensor names, first match wins; --n-cpu-moe N is one such pattern."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.cli import main
from moesim.config.loader import load_scenario
from moesim.engine.run import simulate
from moesim.errors import InputError
from moesim.planner.runtime import int_set_regex
from moesim.policies.execution.llamacpp import block_tensors, llamacpp_layout
from tests.conftest import ROOT
from tests.policies.execution.test_llamacpp_ngl import same_run

MIXTRAL = ROOT / "scenarios" / "mixtral-8x7b-rtx4090-llamacpp-ncpumoe24.yaml"
QWEN_OT = ROOT / "scenarios" / "qwen3-30b-a3b-rtx4080-llamacpp-ot.yaml"
SHORT = ["workload.max_tokens=12", "workload.warmup_tokens=2"]
OT = "policies.execution.override_tensors"
EXPS = r"\.ffn_(up|down|gate)_exps=CPU"


def ot(*patterns) -> str:
    """A ``--set`` of the override list (YAML flow list of single-quoted strings)."""
    return OT + "=[" + ", ".join("'" + p.replace("'", "''") + "'" for p in patterns) + "]"


def layout(path, *sets):
    sc = load_scenario(path, list(sets))
    return llamacpp_layout(sc, list(sc.model.moe_layers), "test")


@pytest.mark.parametrize("n", [20, 24, 29, 32])
def test_n_cpu_moe_equals_its_pattern(n):
    # llama.cpp's --n-cpu-moe N overrides blk.0 .. blk.N-1's expert tensors to CPU
    alternation = r"blk\.(" + "|".join(str(i) for i in range(n)) + ")" + EXPS
    grouped = r"blk\.(" + int_set_regex(range(n)) + ")" + EXPS
    today = simulate(load_scenario(MIXTRAL, [*SHORT, f"policies.cache.cpu_moe_layers={n}"])).summary
    for pat in (alternation, grouped):
        s = simulate(load_scenario(MIXTRAL, [*SHORT, "policies.cache.cpu_moe_layers=0", ot(pat)])).summary
        same_run(today, s)
        assert s["execution"]["host_expert_layers"] == list(range(n))


@settings(max_examples=40, deadline=None)
@given(rules=st.lists(st.tuples(st.sets(st.integers(0, 47), min_size=1), st.sampled_from(["CPU", "CUDA0"])),
                      min_size=1, max_size=4))
def test_first_matching_override_wins(rules):
    # brute force: walk the rules in order for every expert tensor name, the first search hit decides
    pats = [(r"blk\.(" + "|".join(str(b) for b in sorted(bs)) + r")\.ffn_(up|down|gate)_exps", buft)
            for bs, buft in rules]
    lay = layout(QWEN_OT, ot(*[f"{p}={b}" for p, b in pats]))
    sc = load_scenario(QWEN_OT)
    want = set()
    for b in range(48):
        names = [n for n, role in block_tensors(sc.model, b) if role == "exps"]
        devs = set()
        for name in names:
            dev = "CUDA0"
            for p, buft in pats:
                if re.search(p, name):
                    dev = buft
                    break
            devs.add(dev)
        assert len(devs) == 1
        if devs == {"CPU"}:
            want.add(b)
    assert set(lay.host_expert_layers) == want
    assert lay.host_expert_columns == frozenset(want)  # every Qwen3 block is an MoE block


def test_order_of_overrides_matters():
    gpu_teens = r"blk\.1[0-9]\.ffn_(up|down|gate)_exps=CUDA0"
    a = layout(QWEN_OT, ot(gpu_teens, "exps=CPU"))
    assert a.host_expert_layers == tuple(b for b in range(48) if not 10 <= b <= 19)
    b = layout(QWEN_OT, ot("exps=CPU", gpu_teens))
    assert b.host_expert_layers == tuple(range(48))


def test_even_blocks_on_the_cpu():
    s = simulate(load_scenario(QWEN_OT, SHORT)).summary
    m = load_scenario(QWEN_OT).model
    for p in s["per_layer"]:
        if p["layer"] % 2 == 0:
            assert p["cpu_executed"] == p["accesses"] > 0
        else:
            assert p["cpu_executed"] == 0 and p["hits"] == p["accesses"]
    assert s["memory"]["expert_cache_bytes"] == 24 * m.num_experts * m.expert_bytes
    assert s["memory"]["host_expert_bytes"] == 24 * m.num_experts * m.expert_bytes
    assert s["transfers"]["copies"] == 0
    assert s["execution"]["host_expert_layers"] == list(range(0, 48, 2))


def test_patterns_and_n_cpu_moe_combine():
    lay = layout(QWEN_OT, "policies.cache.cpu_moe_layers=3", ot(r"blk\.4[5-7]" + EXPS))
    assert lay.host_expert_layers == (0, 1, 2, 45, 46, 47)


def test_experts_to_their_own_device_change_nothing():
    today = simulate(load_scenario(MIXTRAL, SHORT)).summary
    same_run(today, simulate(load_scenario(MIXTRAL, [*SHORT, ot(r"blk\.(2[4-9]|3[01])" + EXPS[:-3] + "CUDA0")])).summary)


def deepseek_lite(tmp_path, execution: str) -> str:
    p = tmp_path / "dsl.yaml"
    p.write_text(
        "model: {preset: deepseek-v2-lite, dtype: q4_k, expert_dtype: q4_k, kv_dtype: fp16}\n"
        "hardware: {preset: rtx4080-pcie4}\n"
        "trace: {synthetic: {tokens: 64, zipf_s: 0.9, reuse_prob: 0.3}}\n"
        "workload: {batch_size: 1, max_tokens: 12, warmup_tokens: 2, context_tokens: 256}\n"
        f"policies: {{cache: {{kind: all_resident}}, execution: {execution}}}\n")
    return str(p)


def test_shared_experts_and_other_tensors_are_refused(tmp_path):
    for pat, what in ((r"blk\.3\.ffn_(up|down|gate)_shexp=CPU", "shared-expert tensor blk.3.ffn_gate_shexp"),
                      (r"attn_kv_b=CPU", "non-expert tensor blk.0.attn_kv_b"),
                      (r"ffn_down_exps=CPU", "expert tensors land on different devices"),
                      (r"^output\.weight=CPU", "moves output.weight off its layer's device (CUDA0)")):
        sc = load_scenario(deepseek_lite(tmp_path, "{kind: llamacpp, override_tensors: ['" + pat + "']}"))
        with pytest.raises(InputError, match=re.escape(what)) as ei:
            simulate(sc)
        assert ei.value.field == OT


def test_a_dense_first_block_splits_the_first_stage(tmp_path):
    # DeepSeek-V2-Lite: block 0 dense, blocks 1-26 MoE; -ngl 27 (output first) leaves block 0 on the
    # CPU, so the first stage runs block 0 on the CPU and block 1 on the GPU: one boundary
    s = simulate(load_scenario(deepseek_lite(tmp_path, "{kind: llamacpp, n_gpu_layers: 27}")),
                 record_timeline=True)
    ex = s.summary["execution"]
    assert ex["cpu_blocks"] == 1 and ex["host_expert_layers"] == [] and ex["boundaries_per_step"] == 1
    hidden = s.prepared.engine.act_bytes_per_token
    assert s.summary["transfers"]["bytes_h2d"] == hidden * s.summary["tokens"]
    st_ = s.prepared.engine.stage
    assert st_.offload.cpu_blocks[0] == 1 and st_.dense_blocks[0] == 1 and not st_.offload.moe_on_cpu[0]
    assert all(r[5] == 1 for r in s.result.timeline if r[1] == "cpu_dense")  # booked at MoE layer 1


def test_gpu_experts_in_a_cpu_block_are_refused():
    with pytest.raises(InputError, match="GPU experts in a CPU block") as ei:
        layout(QWEN_OT, "policies.execution.n_gpu_layers=40", ot("exps=CUDA0"))
    assert ei.value.field == OT


@pytest.mark.parametrize("value,match", [
    (r"blk\.(0\.ffn=CPU", "bad regular expression"),
    ("exps=GPU", "unknown buffer type 'GPU'"),
    ("exps", "is not REGEX=BUFFER_TYPE"),
])
def test_bad_override_is_one_line_exit_2(tmp_path, capsys, value, match):
    with pytest.raises(InputError, match=re.escape(match)) as ei:
        load_scenario(QWEN_OT, [ot(value)])
    assert "override_tensors" in ei.value.field
    assert main(["run", str(QWEN_OT), "--set", ot(value), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err and "override_tensors" in err
    assert not (tmp_path / "o").exists()


def test_needs_the_static_cache():
    with pytest.raises(InputError, match="all_resident") as ei:
        layout(QWEN_OT, "policies.cache.kind=lru", "policies.cache.capacity_experts=512")
    assert ei.value.field == OT
