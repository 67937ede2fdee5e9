"""Autoregressive decoding with a KV cache, batched with left padding."""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    attention_mask: Tensor | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    page_size: int | None = None,
) -> Tensor:
    """Continue each prompt by up to ``max_new_tokens`` tokens; returns (B, N + new).

    Prompts of different lengths are left-padded, with ``attention_mask``
    (B, N) marking real tokens by 1. The prompt is processed once, then one
    token per step against the cache; the tokens equal those of recomputing a
    full forward at every step. ``temperature`` 0 is greedy decoding, above 0
    samples (optionally from the ``top_k`` most likely tokens) with
    ``generator``. After a row emits ``eos_token_id`` it receives
    ``pad_token_id`` (default: the EOS id); decoding stops when every row has
    finished. The model's train/eval mode is left as it is (call ``eval()``
    for deterministic decoding with dropout). ``page_size`` keeps the cache
    in pages of that many tokens and decodes with
    :func:`sparsa.attention.decode`, which reads only the pages that can hold
    weight and gives the dense result (the same tokens); None (default) keeps
    a dense cache.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError("input_ids must be a tensor (batch, length) with at least one token per row")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
    batch, n_prompt = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have shape {tuple(input_ids.shape)}, got {attention_mask.shape}"
        )
    attention_mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("generate needs left padding: the last column of attention_mask must be all 1")
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0

    if page_size is not None and (
        isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1
    ):
        raise ValueError(f"page_size must be a positive integer or None, got {page_size!r}")
    cache = model.new_cache(capacity=n_prompt + max_new_tokens, page_size=page_size)
    tokens = [input_ids]
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    step_input, step_mask = input_ids, attention_mask
    for _ in range(max_new_tokens):
        logits = model(step_input, attention_mask=step_mask, cache=cache, logits_to_keep=1)[:, -1]
        next_token = _pick(logits.float(), temperature, top_k, generator)
        next_token = torch.where(finished, torch.full_like(next_token, pad_token_id), next_token)
        tokens.append(next_token[:, None])
        if eos_token_id is not None:
            finished |= next_token == eos_token_id
            if bool(finished.all()):
                break
        step_input = next_token[:, None]
        step_mask = torch.cat((step_mask, step_mask.new_ones(batch, 1)), dim=1)
    return torch.cat(tokens, dim=1)


def _pick(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
