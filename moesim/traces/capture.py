"""Capture real routing traces from Hugging Face ``transformers`` MoE models (``moesim trace capture``).

Forward hooks on the router (gate) module of every MoE layer record, for each token-step and
MoE layer, the experts the model chose and their gate weights (optionally the full router
distribution). No model code is forked: the hooks see what the router module computed.

* Where the router module returns its choices (``transformers`` 5: ``(logits, weights, indices)``;
  4.x: DeepSeek-V3 ``(indices, weights)``, GPT-OSS ``(scores, indices)``, Switch
  ``(one-hot dispatch mask, top probability, logits)``) those are recorded as they are.
* Where it returns only the router logits (``transformers`` 4.x ``nn.Linear`` gates of Mixtral,
  Qwen-MoE, OLMoE, Phi-MoE) the selection is reproduced from the logits exactly as that
  architecture does it (see :data:`ARCHITECTURES`, ``selection``).

Rank order: rank 0 is the router's first choice; DeepSeek-V3's group-limited top-k returns its
choices unordered (``topk(sorted=False)``), so they are sorted by gate weight, highest first.
``probs`` (``--probs``) is the router's per-expert score before the top-k: the softmax of the
logits, or DeepSeek-V3's sigmoid scores (without the correction bias).

Prompts run one request at a time: a prefill forward over the prompt (``phase`` 0, one row per
prompt token), then greedy decoding with the KV cache, one forward per generated token that is fed
back (``phase`` 1). ``N`` new tokens give ``N - 1`` decode rows: the last token is never fed back.
``step`` counts forwards over the whole capture. Switch Transformers (encoder-decoder) records one
stack: ``decoder`` (default; every decoder forward is a generation step, so all rows are
``phase`` 1, position 0 being the decoder start token) or ``encoder`` (one forward over each
prompt, all rows ``phase`` 0, nothing generated); ``meta['layers']`` are block indices within that
stack (1, 3, 5, ... for the released checkpoints).

torch and transformers are imported lazily: without them every entry point raises one
:class:`~moesim.errors.InputError` saying to install ``moesim[calibrate]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moesim.errors import InputError
from moesim.traces.format import FORMAT_VERSION, Trace, _why, save_trace

WHERE = "moesim trace capture"


@dataclass(frozen=True)
class Architecture:
    """One supported MoE architecture (a ``transformers`` ``model_type``)."""

    model_type: str
    label: str
    aliases: tuple[str, ...]
    #: config attribute holding the number of routed experts per MoE layer
    experts_attr: str
    #: how the router picks experts and weights (reproduced by :func:`select_from_logits`)
    selection: str
    encoder_decoder: bool = False


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture(
            "mixtral", "Mixtral", ("mixtral",), "num_local_experts",
            "softmax over the router logits (float32), top-k, weights renormalised to sum 1",
        ),
        Architecture(
            "qwen2_moe", "Qwen2-MoE", ("qwen2-moe", "qwen2moe", "qwen1.5-moe"), "num_experts",
            "softmax over the router logits (float32), top-k, weights renormalised when "
            "norm_topk_prob",
        ),
        Architecture(
            "qwen3_moe", "Qwen3-MoE", ("qwen3-moe", "qwen3moe"), "num_experts",
            "softmax over the router logits (float32), top-k, weights renormalised when "
            "norm_topk_prob",
        ),
        Architecture(
            "olmoe", "OLMoE", ("olmoe",), "num_experts",
            "softmax over the router logits (float32), top-k, weights renormalised when "
            "norm_topk_prob",
        ),
        Architecture(
            "deepseek_v3", "DeepSeek-V3", ("deepseek-v3", "deepseekv3"), "n_routed_experts",
            "sigmoid scores (float32); choice scores = scores + e_score_correction_bias; groups "
            "ranked by the sum of their two best choice scores, the best topk_group of n_group kept; "
            "top-k choice scores within them; weights = the unbiased sigmoid scores, renormalised "
            "when norm_topk_prob, times routed_scaling_factor; ranks sorted by weight",
        ),
        Architecture(
            "gpt_oss", "GPT-OSS", ("gpt-oss", "gptoss"), "num_local_experts",
            "top-k of the router logits (router bias included), softmax over those k",
        ),
        Architecture(
            "phimoe", "Phi-MoE", ("phimoe", "phi-moe", "phi-3.5-moe", "phi3.5-moe"), "num_local_experts",
            "sparsemixer in eval mode (top-2): first = argmax logit, weight = softmax over the logits "
            "within 2 x router_jitter_noise (relative) of it; second likewise with the first masked",
        ),
        Architecture(
            "switch_transformers", "Switch Transformers", ("switch", "switch-transformers"), "num_experts",
            "softmax over the router logits (router_dtype), top-1; tokens beyond an expert's "
            "expert_capacity within one sequence are dropped (expert -1, weight 0)",
            encoder_decoder=True,
        ),
    )
}

#: How each architecture's sizes are shrunk by ``--tiny`` (the routing shape — experts, top-k,
#: groups, normalisation — is kept).
_TINY = dict(
    hidden_size=64, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
)
_TINY_BY_TYPE = {
    "deepseek_v3": dict(
        num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, head_dim=8,
    ),
    "switch_transformers": dict(
        d_model=64, d_ff=64, d_kv=16, num_heads=4, num_layers=4, num_decoder_layers=4,
        num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, vocab_size=512,
    ),
}
# derived config fields that must be recomputed after a resize
_DERIVED = ("layer_types", "qk_head_dim", "encoder_sparse_step", "decoder_sparse_step")


def _need_torch():
    """Import torch and transformers, or raise the one-line 'install moesim[calibrate]' error."""
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise InputError(
            f"needs torch and transformers ({_why(exc)}); install them with "
            "pip install 'moesim[calibrate]'",
            source=WHERE,
        ) from None
    return torch, transformers


def resolve_architecture(name: str) -> Architecture:
    """The :class:`Architecture` for a ``model_type`` or an alias (``deepseek-v3``, ``switch``...)."""
    key = name.strip().lower()
    norm = key.replace("-", "_").replace(".", "_")
    for a in ARCHITECTURES.values():
        if norm == a.model_type or key in a.aliases or norm in {x.replace("-", "_").replace(".", "_") for x in a.aliases}:
            return a
    raise InputError(
        f"unknown architecture {name!r}; supported: {', '.join(supported_names())}",
        source=WHERE,
        field="--config",
    )


def supported_names() -> list[str]:
    """Architecture names accepted by ``--config`` (the first alias of each)."""
    return [a.aliases[0] for a in ARCHITECTURES.values()]


def architecture_of(config) -> Architecture:
    """The supported architecture of a ``transformers`` config, or an :class:`InputError`."""
    mt = getattr(config, "model_type", None)
    if mt not in ARCHITECTURES:
        raise InputError(
            f"model type {mt!r} is not supported; supported: "
            + ", ".join(f"{a.label} ({a.model_type})" for a in ARCHITECTURES.values()),
            source=WHERE,
        )
    return ARCHITECTURES[mt]


# ----------------------------------------------------------------------------------------------
# configs and models


def load_config(spec: str):
    """A ``transformers`` config from a config.json file, a directory holding one, or an
    architecture name (that architecture's default config)."""
    _, transformers = _need_torch()
    from transformers import AutoConfig

    p = Path(spec)
    if p.is_dir():
        p = p / "config.json"
    if p.suffix.lower() == ".json" or p.exists():
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError("not found (expected a config.json file or an architecture name)", source=spec, field="--config") from None
        except (OSError, ValueError) as exc:
            raise InputError(f"is not a readable JSON config ({_why(exc)})", source=spec, field="--config") from None
        if not isinstance(d, dict) or not isinstance(d.get("model_type"), str):
            raise InputError("expected a JSON object with a model_type (a transformers config.json)", source=spec, field="--config")
        arch = resolve_architecture(d["model_type"])
        _check_installed(arch, transformers)
        d.pop("model_type")
        try:
            return AutoConfig.for_model(arch.model_type, **d)
        except Exception as exc:
            raise InputError(f"is not a valid {arch.label} config ({_why(exc)})", source=spec, field="--config") from None
    arch = resolve_architecture(spec)
    _check_installed(arch, transformers)
    return AutoConfig.for_model(arch.model_type)


def _check_installed(arch: Architecture, transformers) -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if arch.model_type not in CONFIG_MAPPING:
        raise InputError(
            f"transformers {transformers.__version__} has no {arch.label} ({arch.model_type}); "
            "upgrade transformers",
            source=WHERE,
        )


def tiny_config(config):
    """A copy of ``config`` shrunk to a few small layers, keeping the routing shape (experts,
    top-k, groups, normalisation, capacity). For random-weight captures and tests."""
    from transformers import AutoConfig

    arch = architecture_of(config)
    d = config.to_dict()
    d.pop("model_type", None)
    over = {k: v for k, v in _TINY.items() if k in d}
    over.update(_TINY_BY_TYPE.get(arch.model_type, {}))
    if "first_k_dense_replace" in d:
        over["first_k_dense_replace"] = min(int(d["first_k_dense_replace"] or 0), 1)
    if isinstance(d.get("mlp_only_layers"), list):
        over["mlp_only_layers"] = [i for i in d["mlp_only_layers"] if i < over.get("num_hidden_layers", 4)]
    d.update(over)
    vocab = d.get("vocab_size")
    for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        v = d.get(k)
        if isinstance(vocab, int) and isinstance(v, int) and v >= vocab:  # keep special ids inside the vocabulary
            d[k] = vocab - 1
    for k in _DERIVED:
        d.pop(k, None)
    return AutoConfig.for_model(arch.model_type, **d)


def _torch_dtype(torch, name: str | None):
    if name in (None, "auto"):
        return None
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise InputError(f"unknown dtype {name!r}; expected auto, float32, bfloat16 or float16", source=WHERE, field="--dtype")
    return table[name]


def _check_device(torch, device: str) -> None:
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"unknown device {device!r}; expected cpu, cuda, cuda:N or auto", source=WHERE, field="--device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA was asked for but torch sees no CUDA device; use --device cpu", source=WHERE, field="--device")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"unsupported device {device!r}; expected cpu, cuda, cuda:N or auto", source=WHERE, field="--device")


def build_model(config, *, seed: int = 0, dtype: str | None = None, device: str = "cpu"):
    """A randomly initialised model for ``config`` (seeded), in eval mode on ``device``."""
    torch, _ = _need_torch()
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    arch = architecture_of(config)
    _check_device(torch, device)
    td = _torch_dtype(torch, dtype) or torch.float32
    torch.manual_seed(seed)
    cls = AutoModelForSeq2SeqLM if arch.encoder_decoder else AutoModelForCausalLM
    model = cls.from_config(config)
    model.to(dtype=td)
    if device != "auto":
        model.to(device)
    return model.eval()


def load_pretrained(name: str, *, dtype: str | None = None, device: str = "cpu"):
    """``(model, tokenizer)`` from a Hugging Face model id or a local directory."""
    torch, transformers = _need_torch()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    _check_device(torch, device)
    try:
        config = AutoConfig.from_pretrained(name)
    except Exception as exc:
        raise InputError(f"cannot load the model's config ({_why(exc)})", source=name, field="--model") from None
    arch = architecture_of(config)
    td = _torch_dtype(torch, dtype)
    kw: dict = {}
    dkey = "dtype" if _version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"
    kw[dkey] = td if td is not None else "auto"
    if device == "auto":
        kw["device_map"] = "auto"
    elif device != "cpu":
        kw["device_map"] = {"": device}
    cls = AutoModelForSeq2SeqLM if arch.encoder_decoder else AutoModelForCausalLM
    try:
        model = cls.from_pretrained(name, **kw)
    except Exception as exc:
        raise InputError(f"cannot load the model ({_why(exc)})", source=name, field="--model") from None
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as exc:
        raise InputError(f"cannot load the model's tokenizer ({_why(exc)})", source=name, field="--model") from None
    return model.eval(), tok


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        m = re.match(r"\d+", part)
        out.append(int(m.group()) if m else 0)
    return tuple(out)


class ByteTokenizer:
    """Stand-in tokenizer for random-weight models: UTF-8 bytes, id = byte mod vocab size."""

    def __init__(self, vocab_size: int):
        self.vocab_size = int(vocab_size)

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab_size for b in text.encode("utf-8")]

    def __repr__(self) -> str:
        return f"utf-8 bytes mod {self.vocab_size}"


def _encode(tokenizer, text: str) -> list[int]:
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    ids = tokenizer(text)["input_ids"]
    return [int(i) for i in ids]


# ----------------------------------------------------------------------------------------------
# prompts


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file (one per line, blank lines skipped) or a ``.jsonl`` file (one
    ``{"prompt": "..."}`` object per line)."""
    p = Path(path)
    src = str(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("not found (expected a text file, one prompt per line, or .jsonl)", source=src, field="--prompts") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot be read ({_why(exc)})", source=src, field="--prompts") from None
    jsonl = p.suffix.lower() in (".jsonl", ".ndjson")
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if jsonl:
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise InputError(f"line {n} is not valid JSON ({_why(exc)})", source=src, field="--prompts") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise InputError(f'line {n}: expected an object {{"prompt": "..."}}', source=src, field="--prompts")
            if not obj["prompt"]:
                raise InputError(f"line {n}: the prompt is empty", source=src, field="--prompts")
            prompts.append(obj["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise InputError("holds no prompts", source=src, field="--prompts")
    return prompts


# ----------------------------------------------------------------------------------------------
# routing selection, reproduced from the router logits


def router_logits(arch: Architecture, module, x):
    """The router logits of hidden states ``x``, computed as the architecture's router does."""
    torch, _ = _need_torch()
    F = torch.nn.functional
    if arch.model_type == "switch_transformers":
        return module.classifier(x.to(module.dtype))
    w = module.weight
    x2 = x.reshape(-1, w.shape[1])
    if arch.model_type == "deepseek_v3":
        return F.linear(x2.type(torch.float32), w.type(torch.float32))
    bias = getattr(module, "bias", None)
    return F.linear(x2, w, bias if isinstance(bias, torch.Tensor) else None)


def router_probs(arch: Architecture, module, logits):
    """Per-expert router scores before the top-k: softmax, or DeepSeek-V3's sigmoid."""
    torch, _ = _need_torch()
    if arch.model_type == "deepseek_v3":
        return logits.float().sigmoid()
    return torch.softmax(logits.float(), dim=-1)


def select_from_logits(arch: Architecture, module, config, logits, top_k: int):
    """``(indices [N, K], weights [N, K])`` as the architecture's router picks them.

    ``logits`` is ``[N, E]`` (Switch: ``[B, S, E]``, capacity is counted along ``S``).
    """
    torch, _ = _need_torch()
    mt = arch.model_type
    if mt in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        w, idx = torch.topk(probs, top_k, dim=-1)
        if mt == "mixtral" or getattr(config, "norm_topk_prob", False):
            w = w / w.sum(dim=-1, keepdim=True)
        return idx, w
    if mt == "gpt_oss":
        top, idx = torch.topk(logits, top_k, dim=-1)
        return idx, torch.softmax(top, dim=1, dtype=top.dtype)
    if mt == "deepseek_v3":
        return _deepseek_select(torch, module, config, logits, top_k)
    if mt == "phimoe":
        if top_k != 2:
            raise InputError(f"Phi-MoE's sparsemixer routes top-2, the config says top-{top_k}", source=WHERE)
        return _sparsemixer_eval(torch, logits, float(getattr(config, "router_jitter_noise", 0.01)))
    if mt == "switch_transformers":
        return _switch_select(torch, module, logits)
    raise AssertionError(mt)  # pragma: no cover


def _deepseek_select(torch, module, config, logits, top_k):
    n_exp = logits.shape[-1]
    n_group = int(getattr(config, "n_group", 1) or 1)
    topk_group = int(getattr(config, "topk_group", n_group) or n_group)
    scores = logits.float().sigmoid()
    bias = getattr(module, "e_score_correction_bias", None)
    choice = scores + bias if bias is not None else scores
    group_scores = choice.view(-1, n_group, n_exp // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, n_exp // n_group).reshape(-1, n_exp)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    idx = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    w = scores.gather(1, idx)
    if getattr(config, "norm_topk_prob", False):
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    w = w * float(getattr(config, "routed_scaling_factor", 1.0))
    return idx, w


def _sparsemixer_eval(torch, scores, jitter_eps):
    thr, first = scores.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=thr)
    mask = ((thr - scores) / factor) > (2 * jitter_eps)
    w1 = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1).gather(-1, first)
    masked = torch.scatter(scores, -1, first, float("-inf"))
    thr2, second = masked.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=thr2)
    mask2 = ((thr2 - scores) / factor) > (2 * jitter_eps)
    w2 = torch.softmax(masked.masked_fill(mask2, float("-inf")), dim=-1).gather(-1, second)
    return torch.cat((first, second), dim=-1), torch.cat((w1, w2), dim=-1)


def _switch_select(torch, module, logits):
    input_dtype = getattr(module, "input_dtype", logits.dtype)
    probs = torch.nn.functional.softmax(logits, dim=-1, dtype=module.dtype).to(input_dtype)
    n_exp = logits.shape[-1]
    onehot = torch.nn.functional.one_hot(torch.argmax(probs, dim=-1), num_classes=n_exp)
    onehot = onehot * (torch.cumsum(onehot, dim=-2) <= module.expert_capacity)
    return _switch_from_onehot(torch, onehot, torch.max(probs, dim=-1).values)


def _switch_from_onehot(torch, onehot, top_prob):
    n_exp = onehot.shape[-1]
    onehot = onehot.reshape(-1, n_exp)
    idx = torch.argmax(onehot, dim=-1)
    dropped = onehot.sum(dim=-1) == 0
    idx = torch.where(dropped, torch.full_like(idx, -1), idx)
    w = top_prob.reshape(-1).float().masked_fill(dropped, 0.0)
    return idx.unsqueeze(-1), w.unsqueeze(-1)


def parse_router_output(arch: Architecture, out, num_experts: int, top_k: int):
    """``(indices [N, K], weights [N, K])`` from what the router module returned, or
    ``(None, None)`` when it returned only logits (then they are reproduced)."""
    torch, _ = _need_torch()
    if isinstance(out, torch.Tensor) or not isinstance(out, (tuple, list)):
        return None, None
    ts = [t for t in out if isinstance(t, torch.Tensor)]
    if arch.model_type == "switch_transformers":
        if len(ts) >= 2 and not ts[0].is_floating_point() and ts[0].shape[-1] == num_experts:
            return _switch_from_onehot(torch, ts[0], ts[1])
        return None, None
    if top_k == num_experts:
        return None, None
    ints = [t for t in ts if not t.is_floating_point() and t.shape[-1] == top_k]
    if len(ints) != 1:
        return None, None
    idx = ints[0].reshape(-1, top_k)
    n = idx.shape[0]
    fk = [t for t in ts if t.is_floating_point() and t.shape[-1] == top_k and t.numel() == n * top_k]
    if len(fk) == 1:
        return idx, fk[0].reshape(-1, top_k)
    fe = [t for t in ts if t.is_floating_point() and t.shape[-1] == num_experts and t.numel() == n * num_experts]
    if len(fe) == 1:  # a dense [N, E] score matrix (transformers 4.x GPT-OSS)
        return idx, fe[0].reshape(-1, num_experts).gather(1, idx)
    return None, None


# ----------------------------------------------------------------------------------------------
# hooks

#: Hidden states the speculative next-layer guess (``--spec-next``) may be computed from.
SPEC_INPUTS = ("residual", "gate_input")


def find_routers(model, arch: Architecture, stack: str = "decoder") -> list[tuple[int, str, object]]:
    """``(model layer index, module name, module)`` of each MoE layer's router, in layer order."""
    if arch.encoder_decoder:
        pat = re.compile(rf"(?:^|\.){stack}\.block\.(\d+)\.layer\.\d+\.mlp\.router$")
    else:
        pat = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:mlp|block_sparse_moe)\.(?:gate|router)$")
    found = []
    for name, mod in model.named_modules():
        m = pat.search(name)
        if m is None:
            continue
        w = getattr(getattr(mod, "classifier", mod), "weight", None)
        if w is None or getattr(w, "ndim", 0) != 2:
            continue
        found.append((int(m.group(1)), name, mod))
    found.sort(key=lambda t: t[0])
    layers = [f[0] for f in found]
    if len(set(layers)) != len(layers):
        raise InputError(f"found two routers in one layer ({[f[1] for f in found]})", source=WHERE)
    if not found:
        raise InputError(
            f"found no router modules in this {arch.label} model ({type(model).__name__}); this "
            "transformers version lays the model out differently",
            source=WHERE,
        )
    return found


class RouterHooks:
    """Forward hooks on the routers; :meth:`take` returns one forward's ``[N, L, K]`` choices.

    ``selection``: ``"auto"`` (the router module's own returned indices where it returns them,
    else reproduced from the logits), ``"logits"`` (always reproduced), ``"module"`` (the module's
    own, an error where it returns none).

    ``spec``: also record Mixtral-offloading's speculative guess of the next MoE layer's experts
    (:meth:`take_spec`), the next layer's router applied to a hidden state of this layer:
    ``"residual"`` = the residual stream leaving this decoder layer (after its MoE), passed through
    the next MoE layer's pre-MoE norm as that router expects; ``"gate_input"`` = the hidden state
    this layer's own router saw. ``None`` records no guess.
    """

    def __init__(self, model, arch: Architecture, config, *, num_experts: int, top_k: int,
                 stack: str = "decoder", probs: bool = False, selection: str = "auto",
                 spec: str | None = None):
        if selection not in ("auto", "logits", "module"):
            raise ValueError(f"selection must be auto, logits or module, not {selection!r}")
        if spec not in (None,) + SPEC_INPUTS:
            raise InputError(f"unknown speculative input {spec!r}; expected one of {', '.join(SPEC_INPUTS)}",
                             source=WHERE, field="--spec-next")
        self.arch, self.config = arch, config
        self.E, self.K = int(num_experts), int(top_k)
        self.want_probs, self.selection = probs, selection
        self.routers = find_routers(model, arch, stack)
        for _, name, mod in self.routers:
            w = getattr(mod, "classifier", mod).weight
            if int(w.shape[0]) != self.E:
                raise InputError(
                    f"router {name} scores {int(w.shape[0])} experts, the config says {self.E}", source=WHERE
                )
        self.layers = [r[0] for r in self.routers]
        self.names = [r[1] for r in self.routers]
        self.router_class = type(self.routers[0][2]).__name__
        self.used: set[str] = set()
        self._calls: list[list] = [[] for _ in self.routers]
        self._handles = []
        self.spec = spec
        self._spec_calls: list[list] = [[] for _ in self.routers]
        self._spec_src: list = []  # per column but the last: (module whose output is the guess's input, next norm)
        if spec is not None:
            if arch.encoder_decoder:
                raise InputError(
                    f"--spec-next is not supported for {arch.label} (encoder-decoder); use a decoder-only model",
                    source=WHERE, field="--spec-next",
                )
            mods = dict(model.named_modules())
            for col in range(len(self.routers) - 1):
                block = self.names[col].rsplit(".", 2)[0]  # model.layers.<i>
                nxt = self.names[col + 1].rsplit(".", 2)[0] + ".post_attention_layernorm"
                if block not in mods or nxt not in mods:
                    raise InputError(
                        f"cannot find decoder layer {block} or the next layer's norm {nxt} in this "
                        f"{arch.label} model; --spec-next needs the usual decoder layout",
                        source=WHERE, field="--spec-next",
                    )
                self._spec_src.append((mods[block], mods[nxt]))

    def __enter__(self):
        for col, (_, _, mod) in enumerate(self.routers):
            self._handles.append(mod.register_forward_hook(self._hook(col), with_kwargs=True))
        if self.spec == "residual":
            for col, (block, _) in enumerate(self._spec_src):
                self._handles.append(block.register_forward_hook(self._block_hook(col), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def _hook(self, col: int):
        def hook(module, args, kwargs, out):
            x = args[0] if args else kwargs.get("hidden_states")
            self._calls[col].append(self._record(module, x, out))
            if self.spec == "gate_input" and col + 1 < len(self.routers):
                self._spec_calls[col].append(self.guess_next(col, x))

        return hook

    def _block_hook(self, col: int):
        def hook(module, args, kwargs, out):
            h = out[0] if isinstance(out, (tuple, list)) else out
            torch, _ = _need_torch()
            with torch.no_grad():
                x = self._spec_src[col][1](h)  # the next MoE layer's pre-MoE norm
            self._spec_calls[col].append(self.guess_next(col, x))

        return hook

    def guess_next(self, col: int, x):
        """Experts ``[N, K]`` (int64 numpy) that the router of MoE column ``col + 1`` picks for the
        hidden states ``x`` (``[..., H]``), selected as that architecture's router selects."""
        torch, _ = _need_torch()
        mod = self.routers[col + 1][2]
        with torch.no_grad():
            logits = router_logits(self.arch, mod, x)
            idx, _ = select_from_logits(self.arch, mod, self.config, logits.reshape(-1, self.E), self.K)
        return idx.reshape(-1, self.K).to("cpu", torch.int64).numpy()

    def take_spec(self, n_tokens: int):
        """The speculative guesses of the forward just run, ``[N, L, K]`` (``-1`` in the last
        column, which has no next MoE layer)."""
        L = len(self.routers)
        out = np.full((n_tokens, L, self.K), -1, dtype=np.int64)
        for col in range(L - 1):
            calls = self._spec_calls[col]
            if len(calls) != 1 or calls[0].shape[0] != n_tokens:
                raise InputError(
                    f"speculative guess of column {col} saw {len(calls)} call(s) in a forward over {n_tokens} "
                    "tokens; expected one",
                    source=WHERE,
                )
            out[:, col] = calls[0]
            calls.clear()
        return out

    def _record(self, module, x, out):
        torch, _ = _need_torch()
        with torch.no_grad():
            idx = w = None
            if self.selection != "logits":
                idx, w = parse_router_output(self.arch, out, self.E, self.K)
                if idx is None and self.selection == "module":
                    raise InputError(f"the router module {type(module).__name__} returns no expert indices", source=WHERE)
            logits = None
            if idx is None or self.want_probs:
                logits = router_logits(self.arch, module, x)
            if idx is None:
                idx, w = select_from_logits(self.arch, module, self.config, logits, self.K)
                self.used.add("reproduced from the router logits")
            else:
                self.used.add("the router module's returned indices and weights")
            idx = idx.reshape(-1, idx.shape[-1]).to("cpu", torch.int64)
            w = w.reshape(idx.shape).to("cpu", torch.float32)
            if self.arch.model_type == "deepseek_v3":  # unordered top-k: highest weight first
                order = torch.argsort(w, dim=-1, descending=True, stable=True)
                idx, w = idx.gather(1, order), w.gather(1, order)
            p = None
            if self.want_probs:
                p = router_probs(self.arch, module, logits).reshape(-1, self.E).to("cpu", torch.float32)
            return idx.numpy(), w.numpy(), None if p is None else p.numpy()

    def take(self, n_tokens: int):
        """The choices of the forward just run: ``experts [N, L, K]``, ``weights``, ``probs``."""
        cols = []
        for col, calls in enumerate(self._calls):
            if len(calls) != 1 or calls[0][0].shape[0] != n_tokens:
                got = "no call" if not calls else f"{len(calls)} call(s) of {[c[0].shape[0] for c in calls]} rows"
                raise InputError(
                    f"router {self.names[col]} saw {got} in a forward over {n_tokens} tokens; expected "
                    "one call per forward (a fused MoE kernel may bypass the router module)",
                    source=WHERE,
                )
            cols.append(calls[0])
        for c in self._calls:
            c.clear()
        e = np.stack([c[0] for c in cols], axis=1)
        w = np.stack([c[1] for c in cols], axis=1)
        p = np.stack([c[2] for c in cols], axis=1) if self.want_probs else None
        return e, w, p

    def reset(self) -> None:
        for c in self._calls + self._spec_calls:
            c.clear()


# ----------------------------------------------------------------------------------------------
# capture


def _num_experts_top_k(arch: Architecture, config) -> tuple[int, int]:
    E = getattr(config, arch.experts_attr, None)
    if E is None:
        E = getattr(config, "num_local_experts", None)
    K = 1 if arch.model_type == "switch_transformers" else getattr(config, "num_experts_per_tok", None)
    if not isinstance(E, int) or not isinstance(K, int) or E < 1 or K < 1:
        raise InputError(f"the {arch.label} config names no expert count / top-k", source=WHERE)
    return E, K


def _eos_ids(model) -> set[int]:
    out: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config):
        v = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(v, int):
            out.add(v)
        elif isinstance(v, (list, tuple)):
            out.update(int(x) for x in v if isinstance(x, int))
    return out


def _input_device(model):
    try:
        return model.get_input_embeddings().weight.device
    except Exception:  # pragma: no cover
        return next(model.parameters()).device


def capture_trace(
    model,
    prompts: Sequence,
    *,
    tokenizer=None,
    max_new_tokens: int = 32,
    max_prompt_tokens: int | None = None,
    probs: bool = False,
    stack: str = "decoder",
    ignore_eos: bool = False,
    selection: str = "auto",
    model_name: str | None = None,
    progress: Callable[[dict], None] | None = None,
    spec_next: str | None = None,
) -> Trace:
    """Run ``prompts`` through ``model`` (greedy, KV cache) and return the routing :class:`Trace`.

    ``prompts``: strings (encoded with ``tokenizer``; default :class:`ByteTokenizer`) or lists of
    token ids. ``max_new_tokens`` tokens are generated per prompt (fewer when EOS comes first,
    unless ``ignore_eos``). ``stack``: Switch Transformers only, ``decoder`` or ``encoder``.
    ``progress`` is called after each prompt with a dict (``i``, ``n``, ``prompt_tokens``,
    ``new_tokens``, ``rows``, ``seconds``). ``spec_next`` (``"residual"`` or ``"gate_input"``,
    see :class:`RouterHooks`) also records the speculative next-layer guess as ``spec_next``.
    Meta ``source``/``licence``/``captured_with`` are partly filled; :func:`capture` completes them.
    """
    torch, transformers = _need_torch()
    config = model.config
    arch = architecture_of(config)
    if stack not in ("decoder", "encoder"):
        raise InputError(f"unknown stack {stack!r}; expected decoder or encoder", source=WHERE, field="--stack")
    if not arch.encoder_decoder and stack != "decoder":
        raise InputError(f"--stack encoder is for Switch Transformers; {arch.label} is decoder-only", source=WHERE, field="--stack")
    if max_new_tokens < 1:
        raise InputError(f"expected at least 1, got {max_new_tokens}", source=WHERE, field="--max-new-tokens")
    if not prompts:
        raise InputError("no prompts given", source=WHERE, field="--prompts")
    E, K = _num_experts_top_k(arch, config)
    if tokenizer is None:
        tokenizer = ByteTokenizer(config.vocab_size)
    model.eval()
    dev = _input_device(model)
    eos = set() if ignore_eos else _eos_ids(model)
    import inspect

    keep_kw = {}
    try:
        params = inspect.signature(model.forward).parameters
        if "logits_to_keep" in params:
            keep_kw = {"logits_to_keep": 1}
        elif "num_logits_to_keep" in params:
            keep_kw = {"num_logits_to_keep": 1}
    except (TypeError, ValueError):  # pragma: no cover
        pass

    rows_e, rows_w, rows_p, rows_s = [], [], [], []
    req, tok, stp, ph = [], [], [], []
    step = 0
    t_all = time.perf_counter()
    with RouterHooks(model, arch, config, num_experts=E, top_k=K, stack=stack, probs=probs, selection=selection,
                     spec=spec_next) as hooks, torch.no_grad():

        def record(r: int, positions: Sequence[int], phase: int) -> None:
            nonlocal step
            e, w, p = hooks.take(len(positions))
            rows_e.append(e)
            rows_w.append(w)
            if p is not None:
                rows_p.append(p)
            if spec_next is not None:
                rows_s.append(hooks.take_spec(len(positions)))
            req.append(np.full(len(positions), r, np.int32))
            tok.append(np.asarray(positions, np.int32))
            stp.append(np.full(len(positions), step, np.int32))
            ph.append(np.full(len(positions), phase, np.int8))
            step += 1

        for r, prompt in enumerate(prompts):
            t0 = time.perf_counter()
            ids = _encode(tokenizer, prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
            if max_prompt_tokens is not None:
                ids = ids[:max_prompt_tokens]
            if not ids:
                raise InputError(f"prompt {r} has no tokens", source=WHERE, field="--prompts")
            x = torch.tensor([ids], device=dev)
            P = len(ids)
            hooks.reset()
            n_new = 0
            if arch.encoder_decoder:
                encoder = model.get_encoder()
                enc = encoder(input_ids=x)
                if stack == "encoder":
                    record(r, range(P), 0)
                else:
                    start = _decoder_start(model)
                    nxt = torch.tensor([[start]], device=dev)
                    past = None
                    for pos in range(max_new_tokens):
                        out = model(encoder_outputs=enc, decoder_input_ids=nxt, past_key_values=past, use_cache=True)
                        record(r, [pos], 1)
                        past = out.past_key_values
                        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                        n_new += 1
                        if int(nxt) in eos:
                            break
            else:
                out = model(input_ids=x, use_cache=True, **keep_kw)
                record(r, range(P), 0)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                n_new = 1
                past = out.past_key_values
                while n_new < max_new_tokens and int(nxt) not in eos:
                    out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                    record(r, [P + n_new - 1], 1)
                    past = out.past_key_values
                    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                    n_new += 1
            if progress is not None:
                progress({"i": r + 1, "n": len(prompts), "prompt_tokens": P, "new_tokens": n_new,
                          "rows": sum(len(a) for a in req), "seconds": time.perf_counter() - t0})
        used = sorted(hooks.used)
        layers, names, router_class = hooks.layers, hooks.names, hooks.router_class

    id_dtype = np.int16 if E < 32768 else np.int32
    experts = np.concatenate(rows_e).astype(id_dtype)
    meta = {
        "format_version": FORMAT_VERSION,
        "model": model_name or getattr(config, "_name_or_path", None) or arch.model_type,
        "num_experts": E,
        "top_k": K,
        "layers": [int(x) for x in layers],
        "captured_with": {
            "tool": WHERE,
            "moesim": _moesim_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "device": str(dev),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "architecture": type(model).__name__,
            "model_type": arch.model_type,
            "stack": stack if arch.encoder_decoder else "decoder",
            "hooks": f"forward hooks on {len(names)} {router_class} modules: " + ", ".join(names),
            "selection": "; ".join(used),
            "selection_rule": arch.selection,
            "tokenizer": repr(tokenizer) if isinstance(tokenizer, ByteTokenizer) else getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
            "decoding": f"greedy, KV cache, max_new_tokens={max_new_tokens}" + (", EOS ignored" if ignore_eos else ", stops at EOS")
            + (f", prompts cut to {max_prompt_tokens} tokens" if max_prompt_tokens else ""),
            "seconds": round(time.perf_counter() - t_all, 3),
        },
    }
    if spec_next is not None:
        meta["captured_with"]["spec_next_input"] = spec_next
        meta["captured_with"]["spec_next"] = (
            "the next MoE layer's router applied to "
            + ("the residual stream leaving this decoder layer (after its MoE), through the next layer's "
               "pre-MoE norm" if spec_next == "residual" else "the hidden state this layer's router saw")
            + ", selected by the architecture's rule; -1 in the last column (Mixtral-offloading's "
            "speculative expert guess, Eliseev & Mazur 2023, arXiv:2312.17238)"
        )
    return Trace(
        experts=experts,
        weights=np.concatenate(rows_w).astype(np.float32),
        probs=np.concatenate(rows_p).astype(np.float16) if probs else None,
        request=np.concatenate(req),
        token=np.concatenate(tok),
        step=np.concatenate(stp),
        phase=np.concatenate(ph),
        spec_next=np.concatenate(rows_s).astype(id_dtype) if spec_next is not None else None,
        meta=meta,
    )


def _decoder_start(model) -> int:
    for src in (getattr(model, "generation_config", None), model.config):
        v = getattr(src, "decoder_start_token_id", None) if src is not None else None
        if isinstance(v, int):
            return v
    v = getattr(model.config, "pad_token_id", None)
    return v if isinstance(v, int) else 0


def _moesim_version() -> str:
    try:
        from importlib.metadata import version

        return version("moesim")
    except Exception:
        from moesim import __version__

        return __version__


def capture(
    *,
    out: str | os.PathLike,
    prompts: Sequence[str] | None = None,
    prompts_file: str | os.PathLike | None = None,
    model: str | None = None,
    config: str | None = None,
    random_weights: bool = False,
    tiny: bool = False,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "auto",
    max_new_tokens: int = 32,
    max_prompt_tokens: int | None = None,
    probs: bool = False,
    stack: str = "decoder",
    ignore_eos: bool = False,
    name: str | None = None,
    licence: str | None = None,
    progress: Callable[[dict], None] | None = None,
    spec_next: str | None = None,
) -> Trace:
    """The ``moesim trace capture`` command: load or build the model, read the prompts, capture,
    fill the provenance meta and save to ``out`` (``.npz`` or a directory). Returns the trace."""
    if model is None and config is None:
        raise InputError("give --model (a Hugging Face id or local directory) or --config with --random-weights", source=WHERE, field="--model")
    if model is not None and config is not None:
        raise InputError("give --model or --config, not both", source=WHERE, field="--config")
    if config is not None and not random_weights:
        raise InputError("a config has no weights; add --random-weights (routing of an untrained model) or use --model", source=WHERE, field="--config")
    if tiny and not random_weights:
        raise InputError("--tiny shrinks the model, so its weights cannot be loaded; add --random-weights", source=WHERE, field="--tiny")
    if spec_next is not None and spec_next not in SPEC_INPUTS:
        raise InputError(f"unknown speculative input {spec_next!r}; expected one of {', '.join(SPEC_INPUTS)}",
                         source=WHERE, field="--spec-next")
    if prompts_file is None and not prompts:
        raise InputError("give --prompts FILE (one prompt per line, or .jsonl) or --prompt TEXT", source=WHERE, field="--prompts")
    texts = list(prompts or [])
    pdesc = []
    if prompts_file is not None:
        texts = read_prompts(prompts_file) + texts
        digest = hashlib.sha256(Path(prompts_file).read_bytes()).hexdigest()
        pdesc.append(f"{Path(prompts_file).name} (sha256 {digest[:16]})")
    if prompts:
        pdesc.append(f"{len(prompts)} --prompt argument(s)")
    torch, _ = _need_torch()
    _torch_dtype(torch, dtype)  # validate before any loading
    if random_weights:
        if config is not None:
            cfg = load_config(config)
            cp = Path(config)
            if cp.is_dir():
                base = cp.resolve().name
            elif cp.exists() or cp.suffix.lower() == ".json":
                base = cp.stem
            else:
                base = resolve_architecture(config).aliases[0]
        else:
            from transformers import AutoConfig

            try:
                cfg = AutoConfig.from_pretrained(model)
            except Exception as exc:
                raise InputError(f"cannot load the model's config ({_why(exc)})", source=model, field="--model") from None
            base = model
        architecture_of(cfg)
        if tiny:
            cfg = tiny_config(cfg)
        mdl = build_model(cfg, seed=seed, dtype=dtype, device=device)
        tok = None
        if model is not None:
            try:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(model)
            except Exception:
                tok = None
        label = f"{base} ({'tiny, ' if tiny else ''}random weights, seed {seed})"
        weights_desc = f"random initialisation (seed {seed}){', shrunk by --tiny' if tiny else ''}: the routing of an untrained model, for testing the pipeline, not for studying routing"
    else:
        mdl, tok = load_pretrained(model, dtype=dtype, device=device)
        label = model
        weights_desc = "pretrained"
    arch = architecture_of(mdl.config)
    tr = capture_trace(
        mdl, texts, tokenizer=tok, max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens,
        probs=probs, stack=stack, ignore_eos=ignore_eos, model_name=name or label, progress=progress,
        spec_next=spec_next,
    )
    n_req = len(texts)
    tr.meta["source"] = (
        f"{WHERE}: {arch.label} {label}, {'stack ' + stack + ', ' if arch.encoder_decoder else ''}"
        f"{n_req} prompt(s) from {' and '.join(pdesc)}, greedy decoding up to {max_new_tokens} new "
        f"tokens, one request at a time; weights: {weights_desc}"
    )
    tr.meta["licence"] = licence or (
        "no third-party weights (random initialisation); the prompts' licence applies"
        if random_weights else "unknown: that of the model's outputs and of the prompts (pass --licence)"
    )
    tr.meta["captured_with"]["weights"] = weights_desc
    save_trace(tr, out)
    return tr
