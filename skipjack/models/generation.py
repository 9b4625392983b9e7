"""Sampling text from a whole model in one process, each new token one forward of one position
(the keys and values of the others are cached: `KVCache`)."""

from __future__ import annotations

import torch

from skipjack.models.llama import KVCache, Llama


@torch.no_grad()
def generate(
    model: Llama,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: set[int] | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """The tokens that follow `prompt`, up to `max_new_tokens` or a token of `stop` (included).
    `temperature` 0 takes the most likely token (greedy); otherwise the next token is drawn from
    the softmax at that temperature, restricted to the smallest set of most likely tokens whose
    probability reaches `top_p` (nucleus sampling)."""
    device = model.output_weight().device
    capacity = min(len(prompt) + max_new_tokens, model.cfg.max_seq_len)
    cache = KVCache(model, 1, capacity)
    inputs = torch.tensor([prompt], device=device)
    out: list[int] = []
    while len(out) < max_new_tokens and cache.length + inputs.shape[1] <= capacity:
        logits = model(inputs, cache=cache)[0, -1, : model.cfg.vocab_size].float()
        token = _choose(logits, temperature, top_p, generator)
        out.append(token)
        if stop and token in stop:
            break
        inputs = torch.tensor([[token]], device=device)
    return out


def _choose(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
    if temperature <= 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        before = ordered.cumsum(0) - ordered  # the mass of the more likely tokens
        ordered[before >= top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, ordered)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
