"""Token-level negative log-likelihood without materialising full-vocabulary logits for a long window.

The decoder runs once over the window; the LM head and the loss then run over chunks of positions,
so a 16k-token window never holds a 16k x vocab fp32 tensor. This equals the model's own loss for
causal LMs whose head is a plain projection (LLaMA, GPT-2 and BLOOM families); see the tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _decoder(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_decoder", None)
    decoder = get() if get is not None else None
    return decoder if decoder is not None else model.base_model


@torch.inference_mode()
def token_nll(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """NLL (nats) of tokens ``1..L-1`` of each row given their prefix: shape ``(B, L-1)``, fp32."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be (batch, length >= 2), got {tuple(input_ids.shape)}.")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    hidden = _decoder(model)(
        input_ids=input_ids,
        attention_mask=None if attention_mask is None else attention_mask.to(device),
        use_cache=False,
    ).last_hidden_state
    head = model.get_output_embeddings()
    targets = input_ids[:, 1:]
    out = torch.empty(targets.shape, dtype=torch.float32, device=device)
    for start in range(0, targets.shape[1], chunk_size):
        stop = min(start + chunk_size, targets.shape[1])
        logits = head(hidden[:, start:stop]).float()
        out[:, start:stop] = F.cross_entropy(logits.transpose(1, 2), targets[:, start:stop], reduction="none")
    return out


def perplexity(model: nn.Module, input_ids: torch.Tensor, **kwargs) -> float:
    """``exp`` of the mean token NLL over every predicted token of every row."""
    return math.exp(token_nll(model, input_ids, **kwargs).mean().item())
