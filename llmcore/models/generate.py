"""Autoregressive sampling for the decoder flavours, with a KV cache.

Each step feeds only the newest token: its keys/values are appended to the cache and its query
attends to every cached position (flash_attn_func's bottom-right causal alignment). Without the
cache (`use_cache=False`) every step reruns the whole sequence; both give the same tokens.
"""
from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None):
    """One token per row of logits (B, V): greedy when temperature == 0; otherwise softmax of
    logits / temperature restricted to the top_k largest and to the smallest set whose
    probability reaches top_p (nucleus), then a multinomial draw."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]             # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs          # mass of the strictly more likely tokens
        drop_sorted = before >= top_p              # the most likely token is always kept
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check(model, input_ids, max_new_tokens, temperature, top_k, top_p):
    cfg = model.config
    if cfg.head != "clm" or not cfg.causal:
        raise ValueError("generate needs a causal LM (config.head='clm', causal=True), got "
                         f"head={cfg.head!r}, causal={cfg.causal}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 \
            or input_ids.dtype.is_floating_point or input_ids.shape[1] == 0:
        raise ValueError("input_ids must be a non-empty 2-D integer tensor (batch, prompt_len)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    total = input_ids.shape[1] + max_new_tokens
    if cfg.position == "learned" and total > cfg.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens = {total} exceeds max_seq_len={cfg.max_seq_len}")


@torch.no_grad()
def generate(model, input_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, *,
             use_cache: bool = True, eos_token_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """input_ids (B, N) -> (B, N + max_new_tokens). Rows that produced `eos_token_id` keep
    emitting it. The model runs in eval mode (restored afterwards)."""
    _check(model, input_ids, max_new_tokens, temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    try:
        B, N = input_ids.shape
        cache = model.new_cache(B, N + max_new_tokens) if use_cache else None
        ids, step = input_ids, input_ids
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            h = model.hidden_states(step if use_cache else ids, cache=cache)[:, -1]   # (B, E)
            nxt = sample_next(model.lm_logits(h), temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            step = nxt[:, None].to(ids.dtype)
            ids = torch.cat((ids, step), dim=1)
        return ids
    finally:
        model.train(was_training)
