"""SelfAttention: fused QKV projection -> llmcore.attention -> output projection, with GQA,
causal / sliding-window masks, softcap, key padding masks, rotary embeddings and a KV cache."""
from __future__ import annotations

import torch

from llmcore.ops.attention import attention
from llmcore.ops.rope import rope


class KVCache:
    """Keys and values of the tokens seen so far, (B, Hkv, N, D) each, for one layer. Any object
    with this `update` works as SelfAttention's kv_cache."""

    def __init__(self):
        self.key = self.value = None

    def update(self, key, value):
        """Appends the new tokens' key, value (B, Hkv, n, D); returns all of them."""
        if self.key is not None:
            key, value = torch.cat([self.key, key], dim=2), torch.cat([self.value, value], dim=2)
        self.key, self.value = key, value
        return key, value


class SelfAttention(torch.nn.Module):
    """Multi-head (or grouped-query, num_kv_heads < num_heads) self-attention.

    Parameters: `qkv` Linear(embed_dim, (Hq + 2 Hkv) D), rows ordered [q heads, k heads, v heads];
    `out_proj` Linear(Hq D, embed_dim); D = embed_dim // num_heads. `bias` sets both biases
    unless `qkv_bias` / `out_bias` say otherwise. `dropout` is the attention dropout, used in
    training only. causal, window_size (left, right), softcap: as llmcore.attention, aligned so
    that the new tokens are the last ones of the key sequence (matters with a kv_cache).
    """

    def __init__(self, embed_dim, num_heads, num_kv_heads=None, bias=True, dropout=0.0,
                 causal=False, *, qkv_bias=None, out_bias=None, window_size=(-1, -1),
                 softcap=0.0, backend="auto", device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim % num_heads or num_heads % num_kv_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a multiple of num_heads "
                             f"({num_heads}), itself a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout, self.causal, self.backend = dropout, causal, backend
        self.window_size, self.softcap = tuple(window_size), softcap
        kw = dict(device=device, dtype=dtype)
        self.qkv = torch.nn.Linear(embed_dim, (num_heads + 2 * num_kv_heads) * self.head_dim,
                                   bias=bias if qkv_bias is None else qkv_bias, **kw)
        self.out_proj = torch.nn.Linear(num_heads * self.head_dim, embed_dim,
                                        bias=bias if out_bias is None else out_bias, **kw)

    def forward(self, x, attention_mask=None, rotary=None, kv_cache=None):
        """x (B, N, E) -> (B, N, E).

        attention_mask: (B, Nk) key padding mask, True / nonzero = a real token, over all keys
        (cached ones first). rotary: (cos, sin), each (N, D) or (B, N, D), for the new tokens'
        positions, applied to q and k. kv_cache: a KVCache (or anything with its `update`)."""
        B, N, _ = x.shape
        hq, hkv = self.num_heads, self.num_kv_heads
        qkv = self.qkv(x).view(B, N, hq + 2 * hkv, self.head_dim)
        q, k, v = qkv.split([hq, hkv, hkv], dim=2)                  # (B, N, H, D)
        if rotary is not None:       # one op for q and k; flash_attn has no rope kernel
            q, k = rope(q, k, *rotary,
                        backend="auto" if self.backend == "flash_attn" else self.backend)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))            # (B, H, N, D)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        nk = k.shape[2]
        left, right = self.window_size
        is_causal = self.causal
        mask = None
        if nk != N and (is_causal or left >= 0 or right >= 0):
            # llmcore.attention aligns top-left, but new token i is key position i + nk - N:
            # build the positional mask here, rel = j - (i + nk - N)
            rel = (torch.arange(nk, device=x.device)[None, :]
                   - torch.arange(nk - N, nk, device=x.device)[:, None])     # (N, Nk)
            right = 0 if is_causal else right
            mask = torch.ones_like(rel, dtype=torch.bool)
            if left >= 0:
                mask = mask & (rel >= -left)
            if right >= 0:
                mask = mask & (rel <= right)
            is_causal, left, right = False, -1, -1
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, nk):
                raise ValueError(f"attention_mask must have shape (batch, keys) = {(B, nk)}, "
                                 f"got {tuple(attention_mask.shape)}")
            pad = (attention_mask != 0)[:, None, None, :]              # (B, 1, 1, Nk)
            mask = pad if mask is None else mask & pad
        out = attention(q, k, v, mask, self.dropout if self.training else 0.0, is_causal,
                        enable_gqa=hq != hkv, window_size=(left, right), softcap=self.softcap,
                        backend=self.backend)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, hq * self.head_dim))
