"""GPT-2 (`GPT2LMHeadModel`) and Llama-layout (`LlamaForCausalLM`, `MistralForCausalLM`,
`Qwen2ForCausalLM`) weights <-> jaxlm decoder parameters.

GPT-2: learned positions, LayerNorm with biases, tanh-GELU, tied output, fused `c_attn` query/key/
value (Conv1D weights are [in, out]). Llama: rotary positions (half-split, as transformers'
rotate_half; Llama 3 rescaling), RMSNorm, no biases, SwiGLU, grouped-query attention, untied or
tied output (Linear weights are [out, in]). Mistral is Llama's layout with attention limited to
a sliding window of recent tokens: within the window the two compute the same, so an import
sets `model.max_len` to the window and exports as Llama. Qwen2 is Llama's layout with biases on
the query, key and value projections (`model.qkv_bias`).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Mapping

import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.errors import UserError
from jaxlm.hf import place
from jaxlm.models.layers import padded_vocab

ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
                 "Qwen2ForCausalLM": "llama"}
_LLAMA_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings")
REQUIRED = {"gpt2": ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions"), "llama": _LLAMA_KEYS}


def model_config(hf: dict, base: ModelConfig) -> ModelConfig:
    """A jaxlm ModelConfig with the shapes and numerics of a GPT-2 or Llama config.json."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UserError(f"GPT-2 activation_function '{hf['activation_function']}' is not supported; "
                            "jaxlm computes gelu_new")
        return dataclasses.replace(
            base, num_layers=hf["n_layer"], embed_dim=hf["n_embd"], num_heads=hf["n_head"], num_kv_heads=0,
            mlp="plain", mlp_dim=hf.get("n_inner") or 4 * hf["n_embd"],
            vocab_size=padded_vocab(hf["vocab_size"], base.vocab_multiple), max_len=hf["n_positions"],
            positions="learned", norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            activation="gelu_tanh", use_bias=True, tie_embeddings=True, dropout=hf.get("resid_pdrop", 0.1),
            rope_scaling="none")
    qwen2 = kind == "qwen2"  # its query, key and value projections have biases; nothing else has
    if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias") or (hf.get("attention_bias") and not qwen2):
        raise UserError("this Llama config has biases or an activation other than SiLU, which jaxlm's Llama "
                        "layout does not have")
    max_len = hf["max_position_embeddings"]
    window = hf.get("sliding_window") if hf.get("use_sliding_window", kind == "mistral") else None
    if window and window < max_len:
        print(f"note: {hf['architectures'][0]} attends to the last {window} tokens only; jaxlm attends to all, "
              f"which is the same up to {window} tokens, so model.max_len={window}", file=sys.stderr)
        max_len = window
    heads = hf["num_attention_heads"]
    if hf.get("head_dim", hf["hidden_size"] // heads) * heads != hf["hidden_size"]:
        raise UserError("head_dim x num_attention_heads must equal hidden_size in jaxlm's Llama layout")
    rope = dict(hf.get("rope_parameters") or {})  # transformers >= 5 keeps rope_theta in here
    rope.update(hf.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise UserError(f"rope_type '{kind}' is not supported; jaxlm rescales rotary positions as Llama 3 does "
                        "(llama3) or not at all")
    scaling = {}
    if kind == "llama3":
        scaling = dict(rope_scaling="llama3", rope_factor=rope["factor"], rope_low_freq_factor=rope["low_freq_factor"],
                       rope_high_freq_factor=rope["high_freq_factor"],
                       rope_original_max_len=rope["original_max_position_embeddings"])
    return dataclasses.replace(
        base, num_layers=hf["num_hidden_layers"], embed_dim=hf["hidden_size"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads, mlp="swiglu", mlp_dim=hf["intermediate_size"],
        vocab_size=padded_vocab(hf["vocab_size"], base.vocab_multiple), max_len=max_len,
        positions="rotary", rope_base=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), activation="silu", use_bias=False, qkv_bias=qwen2,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dropout=hf.get("attention_dropout", 0.0),
        **({"rope_scaling": "none"} | scaling))


def _names(kind: str, cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """HF tensor name -> jaxlm parameter path (GPT-2's fused c_attn appears as three names,
    `c_attn.q/k/v`, cut by `_read` and joined by `join_fused`)."""
    out: dict[str, tuple[str, ...]] = {}
    if kind == "gpt2":
        out["transformer.wte.weight"] = ("token_embed", "embedding")
        out["transformer.wpe.weight"] = ("position_embed", "embedding")
        out["transformer.ln_f.weight"] = ("ln_final", "LayerNorm_0", "scale")
        out["transformer.ln_f.bias"] = ("ln_final", "LayerNorm_0", "bias")
        dense = {"attn.c_attn.q": ("attention", "query"), "attn.c_attn.k": ("attention", "key"),
                 "attn.c_attn.v": ("attention", "value"), "attn.c_proj": ("attention", "out"),
                 "mlp.c_fc": ("mlp", "wi"), "mlp.c_proj": ("mlp", "wo")}
        for i in range(cfg.num_layers):
            h, b = f"transformer.h.{i}.", f"block_{i}"
            for hf_norm, norm in (("ln_1", "ln_attention"), ("ln_2", "ln_mlp")):
                out[f"{h}{hf_norm}.weight"] = (b, norm, "LayerNorm_0", "scale")
                out[f"{h}{hf_norm}.bias"] = (b, norm, "LayerNorm_0", "bias")
            for hf_name, path in dense.items():
                out[f"{h}{hf_name}.weight"] = (b, *path, "kernel")
                out[f"{h}{hf_name}.bias"] = (b, *path, "bias")
        return out
    out["model.embed_tokens.weight"] = ("token_embed", "embedding")
    out["model.norm.weight"] = ("ln_final", "RMSNorm_0", "scale")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = ("lm_head", "kernel")
    for i in range(cfg.num_layers):
        h, b = f"model.layers.{i}.", f"block_{i}"
        out[f"{h}input_layernorm.weight"] = (b, "ln_attention", "RMSNorm_0", "scale")
        out[f"{h}post_attention_layernorm.weight"] = (b, "ln_mlp", "RMSNorm_0", "scale")
        for proj, target in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out")):
            out[f"{h}self_attn.{proj}_proj.weight"] = (b, "attention", target, "kernel")
            if cfg.qkv_bias and proj != "o":
                out[f"{h}self_attn.{proj}_proj.bias"] = (b, "attention", target, "bias")
        for proj, target in (("gate", "wi_gate"), ("up", "wi"), ("down", "wo")):
            out[f"{h}mlp.{proj}_proj.weight"] = (b, "mlp", target, "kernel")
    return out


def _to_jaxlm(name: str, w: np.ndarray, cfg: ModelConfig, kind: str) -> np.ndarray:
    """One HF tensor in the layout of its jaxlm parameter."""
    heads, head_dim = cfg.num_heads, cfg.embed_dim // cfg.num_heads
    if name.endswith(("wte.weight", "embed_tokens.weight")):
        return np.pad(w, [(0, cfg.vocab_size - w.shape[0]), (0, 0)])
    if name == "lm_head.weight":  # [vocab, embed] -> [embed, padded vocab]
        return np.pad(w.T, [(0, 0), (0, cfg.vocab_size - w.shape[0])])
    if kind == "gpt2":  # Conv1D weights are [in, out] already
        if ".c_attn." in name:
            return w.reshape(-1, heads, head_dim) if name.endswith("weight") else w.reshape(heads, head_dim)
        if "attn.c_proj.weight" in name:
            return w.reshape(heads, head_dim, -1)
        return w
    if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
        return w.T.reshape(w.shape[1], -1, head_dim)  # [embed, heads or kv heads, head_dim]
    if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
        return w.reshape(-1, head_dim)  # [heads or kv heads, head_dim]
    if name.endswith("o_proj.weight"):
        return w.T.reshape(heads, head_dim, -1)
    return w.T if w.ndim == 2 else w


def _to_hf(name: str, p: np.ndarray, cfg: ModelConfig, kind: str, vocab: int) -> np.ndarray:
    """The inverse of `_to_jaxlm` (the padded vocabulary cut back to `vocab`)."""
    if name.endswith(("wte.weight", "embed_tokens.weight")):
        return p[:vocab]
    if name == "lm_head.weight":
        return p[:, :vocab].T
    if kind == "gpt2":
        if ".c_attn." in name:  # [embed, heads, head_dim] -> [embed, embed]; bias [heads, head_dim] -> [embed]
            return p.reshape(p.shape[0], -1) if name.endswith("weight") else p.reshape(-1)
        if "attn.c_proj.weight" in name:  # [heads, head_dim, embed] -> [embed, embed]
            return p.reshape(-1, p.shape[-1])
        return p
    if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
        return p.reshape(p.shape[0], -1).T
    if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
        return p.reshape(-1)
    if name.endswith("o_proj.weight"):
        return p.reshape(-1, p.shape[-1]).T
    return p.T if p.ndim == 2 else p


def _stored(name: str) -> str:
    """The name a tensor is stored under: GPT-2's `c_attn.q/k/v` are parts of the fused `c_attn`."""
    return re.sub(r"\.c_attn\.[qkv]\.", ".c_attn.", name)


def _read(tensors: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """One HF tensor by name (GPT-2's `c_attn.q/k/v` cut from the fused tensor as it is read)."""
    stored = _stored(name)
    if stored == name:
        return tensors[name]
    return np.split(tensors[stored], 3, axis=-1)["qkv".index(name.split(".c_attn.")[1][0])]


def join_fused(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """GPT-2's three query/key/value tensors `c_attn.q/k/v` as its one fused `c_attn`."""
    out = {}
    for name, w in tensors.items():
        if ".attn.c_attn.q." in name:
            parts = [tensors[name.replace("c_attn.q.", f"c_attn.{p}.")] for p in "qkv"]
            out[name.replace("c_attn.q.", "c_attn.")] = np.concatenate(parts, axis=-1)
        elif ".attn.c_attn." not in name:
            out[name] = w
    return out


def place_params(tensors: Mapping[str, np.ndarray], kind: str, cfg: ModelConfig, params: dict,
                 source: str) -> tuple[dict, list[str]]:
    """`place.place_params` with a GPT-2 or Llama-layout name table (see there)."""
    tied = {"lm_head.weight"} if cfg.tie_embeddings else set()
    return place.place_params(tensors, _names(kind, cfg), lambda name, w: _to_jaxlm(name, w, cfg, kind), params,
                              source, kind, read=_read, stored=_stored, tied=tied)


def from_params(params: dict, kind: str, cfg: ModelConfig, vocab: int) -> dict[str, np.ndarray]:
    """HF tensors of jaxlm decoder params (unrolled)."""
    out = {}
    for name, path in _names(kind, cfg).items():
        node = params
        for key in path:
            node = node[key]
        out[name] = np.ascontiguousarray(_to_hf(name, np.asarray(node, np.float32), cfg, kind, vocab))
    return join_fused(out) if kind == "gpt2" else out


def hf_config(kind: str, m: ModelConfig, vocab: int, bos: int, eos: int) -> dict:
    """config.json of a decoder run."""
    if kind == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab,
                "n_embd": m.embed_dim, "n_layer": m.num_layers, "n_head": m.num_heads,
                "n_inner": m.mlp_dim or 4 * m.embed_dim, "n_positions": m.max_len,
                "activation_function": "gelu_new", "layer_norm_epsilon": m.norm_eps, "resid_pdrop": m.dropout,
                "embd_pdrop": m.dropout, "attn_pdrop": 0.0, "bos_token_id": bos, "eos_token_id": eos,
                "tie_word_embeddings": True}
    rope = {"rope_theta": m.rope_base, "rope_type": "default"}
    if m.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=m.rope_factor, low_freq_factor=m.rope_low_freq_factor,
                    high_freq_factor=m.rope_high_freq_factor, original_max_position_embeddings=m.rope_original_max_len)
    arch, model_type = ("Qwen2ForCausalLM", "qwen2") if kind == "qwen2" else ("LlamaForCausalLM", "llama")
    return {"architectures": [arch], "model_type": model_type, "vocab_size": vocab,
            "hidden_size": m.embed_dim, "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
            "num_key_value_heads": m.num_kv_heads or m.num_heads, "intermediate_size": m.mlp_dim or 4 * m.embed_dim,
            "max_position_embeddings": m.max_len, "hidden_act": "silu", "rms_norm_eps": m.norm_eps,
            "rope_theta": m.rope_base, "rope_scaling": rope if m.rope_scaling == "llama3" else None,
            "rope_parameters": rope, "attention_bias": False, "mlp_bias": False, "use_sliding_window": False,
            "tie_word_embeddings": m.tie_embeddings, "bos_token_id": bos, "eos_token_id": eos}


def kind_of(m: ModelConfig) -> str:
    """Which HF layout a decoder's config exports as, or an error saying what does not fit."""
    if (m.positions, m.norm, m.use_bias, m.tie_embeddings, m.mlp, m.activation, m.num_kv_heads) == (
            "learned", "layernorm", True, True, "plain", "gelu_tanh", 0):
        return "gpt2"
    if (m.positions, m.norm, m.use_bias, m.mlp) == ("rotary", "rmsnorm", False, "swiglu"):
        return "qwen2" if m.qkv_bias else "llama"
    raise UserError("this decoder is neither GPT-2 (learned positions, LayerNorm, biases, tanh-GELU, tied) "
                    "nor Llama (rotary, RMSNorm, no biases but Qwen2's query/key/value biases, SwiGLU) in layout; "
                    "it cannot be exported")
