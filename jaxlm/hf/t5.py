"""T5 (`T5ForConditionalGeneration`, v1.0 and v1.1 layouts) weights <-> jaxlm encoder-decoder
parameters.

T5: relative position buckets (one table a stack, in its first layer's self-attention),
RMSNorm before each sublayer and at the end of each stack, no biases, unscaled attention scores;
v1.0 has a ReLU MLP and a tied output layer fed hidden states scaled by d_model ** -0.5, v1.1 a
gated-GELU MLP (`wi_0` the gate, `wi_1` the linear half) and an untied output. Linear weights are
[out, in]; heads are `d_kv` wide, not necessarily d_model / num_heads.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.errors import UserError
from jaxlm.models.layers import padded_vocab

ARCHITECTURES = {"T5ForConditionalGeneration": "t5"}
REQUIRED = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
_ATTENTION = {"q": "query", "k": "key", "v": "value", "o": "out"}


def model_config(hf: dict, base: ModelConfig) -> ModelConfig:
    """A jaxlm ModelConfig with the shapes and numerics of a T5 config.json."""
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in ("relu", "gated-gelu"):
        raise UserError(f"T5 feed_forward_proj '{proj}' is not supported; jaxlm computes relu (v1.0) and gated-gelu (v1.1)")
    tied = bool(hf.get("tie_word_embeddings", True))
    return dataclasses.replace(
        base, num_layers=hf["num_layers"], decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        embed_dim=hf["d_model"], num_heads=hf["num_heads"], num_kv_heads=0, head_dim=hf["d_kv"], mlp_dim=hf["d_ff"],
        mlp="geglu" if proj == "gated-gelu" else "plain", activation="relu",
        vocab_size=padded_vocab(hf["vocab_size"], base.vocab_multiple), max_len=hf.get("n_positions", 512),
        positions="relative", relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128), norm="rmsnorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), use_bias=False, qkv_bias=False, prenorm=True,
        scale_attention=False, scale_embeddings=False, tie_embeddings=tied,
        tied_output_scale=bool(hf.get("scale_decoder_outputs", tied)), dropout=hf.get("dropout_rate", 0.1))


def names(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """HF tensor name -> jaxlm parameter path (unrolled layers)."""
    out: dict[str, tuple[str, ...]] = {"shared.weight": ("token_embed", "embedding")}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = ("lm_head", "kernel")
    mlp = {"wi_0": "wi_gate", "wi_1": "wi", "wo": "wo"} if cfg.mlp == "geglu" else {"wi": "wi", "wo": "wo"}
    for stack, layers in (("encoder", cfg.num_layers), ("decoder", cfg.decoder_layers or cfg.num_layers)):
        sublayers = [("SelfAttention", "attention", "ln_attention")]
        if stack == "decoder":
            sublayers.append(("EncDecAttention", "cross_attention", "ln_cross_attention"))
        out[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (stack, "relative_bias")
        out[f"{stack}.final_layer_norm.weight"] = (stack, "ln_final", "RMSNorm_0", "scale")
        for i in range(layers):
            h, b = f"{stack}.block.{i}.layer.", (stack, f"block_{i}")
            for k, (hf_name, module, norm) in enumerate(sublayers):
                out[f"{h}{k}.layer_norm.weight"] = (*b, norm, "RMSNorm_0", "scale")
                for proj, target in _ATTENTION.items():
                    out[f"{h}{k}.{hf_name}.{proj}.weight"] = (*b, module, target, "kernel")
            k = len(sublayers)
            out[f"{h}{k}.layer_norm.weight"] = (*b, "ln_mlp", "RMSNorm_0", "scale")
            for hf_name, target in mlp.items():
                out[f"{h}{k}.DenseReluDense.{hf_name}.weight"] = (*b, "mlp", target, "kernel")
    return out


def to_jaxlm(name: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """One HF tensor in the layout of its jaxlm parameter."""
    if name == "shared.weight":
        return np.pad(w, [(0, cfg.vocab_size - w.shape[0]), (0, 0)])
    if name == "lm_head.weight":  # [vocab, embed] -> [embed, padded vocab]
        return np.pad(w.T, [(0, 0), (0, cfg.vocab_size - w.shape[0])])
    if name.endswith((".q.weight", ".k.weight", ".v.weight")):  # [heads * d_kv, embed] -> [embed, heads, d_kv]
        return w.T.reshape(w.shape[1], -1, cfg.head_size)
    if name.endswith(".o.weight"):  # [embed, heads * d_kv] -> [heads, d_kv, embed]
        return w.T.reshape(-1, cfg.head_size, w.shape[0])
    return w.T if w.ndim == 2 and "relative_attention_bias" not in name else w


def to_hf(name: str, p: np.ndarray, vocab: int) -> np.ndarray:
    """The inverse of `to_jaxlm` (the padded vocabulary cut back to `vocab`)."""
    if name == "shared.weight":
        return p[:vocab]
    if name == "lm_head.weight":
        return p[:, :vocab].T
    if name.endswith((".q.weight", ".k.weight", ".v.weight")):
        return p.reshape(p.shape[0], -1).T
    if name.endswith(".o.weight"):
        return p.reshape(-1, p.shape[-1]).T
    return p.T if p.ndim == 2 and "relative_attention_bias" not in name else p


def from_params(params: dict, cfg: ModelConfig, vocab: int) -> dict[str, np.ndarray]:
    """HF tensors of jaxlm encoder-decoder params (unrolled)."""
    out = {}
    for name, path in names(cfg).items():
        node = params
        for key in path:
            node = node[key]
        out[name] = np.ascontiguousarray(to_hf(name, np.asarray(node, np.float32), vocab))
    return out


def check_layout(m: ModelConfig) -> None:
    """An error naming what does not fit T5's layout, if anything."""
    t5 = (m.positions, m.norm, m.use_bias or m.qkv_bias, m.scale_attention, m.prenorm, m.scale_embeddings,
          m.num_kv_heads in (0, m.num_heads)) == ("relative", "rmsnorm", False, False, True, False, True)
    mlp = (m.mlp, m.activation) == ("plain", "relu") or m.mlp == "geglu"
    if not (t5 and mlp and m.tied_output_scale == m.tie_embeddings and not m.copy_attention):
        raise UserError("this encoder-decoder is not in T5's layout (relative positions, RMSNorm before each "
                        "sublayer, no biases, unscaled attention, a ReLU or gated-GELU MLP, a scaled tied or an "
                        "untied output, no copy head); it cannot be exported")


def hf_config(m: ModelConfig, vocab: int, pad: int, eos: int, start: int) -> dict:
    """config.json of a T5-layout run."""
    return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": vocab,
            "d_model": m.embed_dim, "d_kv": m.head_size, "d_ff": m.mlp_dim or 4 * m.embed_dim,
            "num_layers": m.num_layers, "num_decoder_layers": m.decoder_layers or m.num_layers,
            "num_heads": m.num_heads, "relative_attention_num_buckets": m.relative_buckets,
            "relative_attention_max_distance": m.relative_max_distance, "dropout_rate": m.dropout,
            "layer_norm_epsilon": m.norm_eps, "feed_forward_proj": "gated-gelu" if m.mlp == "geglu" else "relu",
            "tie_word_embeddings": m.tie_embeddings, "scale_decoder_outputs": m.tie_embeddings,
            "is_encoder_decoder": True, "pad_token_id": pad, "eos_token_id": eos, "decoder_start_token_id": start}
