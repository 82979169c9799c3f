"""An independent plain-NumPy forward pass of the dense decoder, used to check models/transformer.py.

Written from the maths, not from the flax code: float64 throughout, explicit per-head loops, an explicit
causal mask, explicit GQA head mapping (query head h reads K/V head h // (H / G)). It reads the same parameter
tree (the 'params' collection, unboxed) and the config's plain attributes; it imports nothing from models/.
"""

from __future__ import annotations

import numpy as np


def _get(tree, *path):
    for key in path:
        tree = tree[key]
    return np.asarray(tree, dtype=np.float64)


def _rmsnorm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x_LxK, theta):
    """Rotate-half RoPE: dims (i, i + K/2) rotated by position * theta^(-2i/K)."""
    L, K = x_LxK.shape
    half = K // 2
    out = np.empty_like(x_LxK)
    for pos in range(L):
        for i in range(half):
            angle = pos * theta ** (-2.0 * i / K)
            a, b = x_LxK[pos, i], x_LxK[pos, i + half]
            out[pos, i] = a * np.cos(angle) - b * np.sin(angle)
            out[pos, i + half] = b * np.cos(angle) + a * np.sin(angle)
    return out


def _linear(x, layer, key, n_in):
    y = np.tensordot(x, _get(layer, key, "kernel"), axes=n_in)
    if "bias" in layer[key]:
        y = y + _get(layer, key, "bias")
    return y


def _attention(x_LxD, layer, cfg):
    H = cfg.n_heads
    G = cfg.n_heads if cfg.n_kv_heads is None else cfg.n_kv_heads
    attn = layer["attn"]
    q_LxHxK = _linear(x_LxD, attn, "q", 1)
    k_LxGxK = _linear(x_LxD, attn, "k", 1)
    v_LxGxK = _linear(x_LxD, attn, "v", 1)
    L, _, K = q_LxHxK.shape
    if cfg.qk_norm:
        q_LxHxK = _rmsnorm(q_LxHxK, _get(attn, "q_norm", "scale"), cfg.norm_eps)
        k_LxGxK = _rmsnorm(k_LxGxK, _get(attn, "k_norm", "scale"), cfg.norm_eps)
    out_LxHxK = np.zeros((L, H, K))
    for h in range(H):
        g = h // (H // G)
        q = _rope(q_LxHxK[:, h], cfg.rope_theta)
        k = _rope(k_LxGxK[:, g], cfg.rope_theta)
        scores = q @ k.T / np.sqrt(K)
        for i in range(L):
            s = scores[i, : i + 1]  # query i sees keys 0..i
            p = np.exp(s - s.max())
            p /= p.sum()
            out_LxHxK[i, h] = p @ v_LxGxK[: i + 1, g]
    return _linear(out_LxHxK, attn, "o", 2)


def _mlp(x_LxD, layer):
    mlp = layer["mlp"]
    gate = _linear(x_LxD, mlp, "gate", 1)
    up = _linear(x_LxD, mlp, "up", 1)
    silu = gate / (1.0 + np.exp(-gate))
    return _linear(silu * up, mlp, "down", 1)


def _layers(params, n_layers):
    """Per-layer parameter dicts, from a scanned stack (leading layer axis) or blocks_0..blocks_{n-1}."""
    if "blocks" in params:
        def index(tree, i):
            return {k: index(v, i) if isinstance(v, dict) else np.asarray(v)[i] for k, v in tree.items()}

        return [index(params["blocks"], i) for i in range(n_layers)]
    return [params[f"blocks_{i}"] for i in range(n_layers)]


def forward(params, cfg, tokens_BxL) -> np.ndarray:
    """Logits [B, L, V] in float64. ``params`` is the unboxed 'params' collection of the flax model."""
    table_VxD = _get(params, "embed", "embedding")
    out = []
    for tokens_L in np.asarray(tokens_BxL):
        x_LxD = table_VxD[tokens_L]
        for layer in _layers(params, cfg.n_layers):
            h_LxD = _rmsnorm(x_LxD, _get(layer, "attn_norm", "scale"), cfg.norm_eps)
            x_LxD = x_LxD + _attention(h_LxD, layer, cfg)
            h_LxD = _rmsnorm(x_LxD, _get(layer, "mlp_norm", "scale"), cfg.norm_eps)
            x_LxD = x_LxD + _mlp(h_LxD, layer)
        h_LxD = _rmsnorm(x_LxD, _get(params, "final_norm", "scale"), cfg.norm_eps)
        head_DxV = table_VxD.T if cfg.tie_embeddings else _get(params, "lm_head", "kernel")
        out.append(h_LxD @ head_DxV)
    return np.stack(out)
