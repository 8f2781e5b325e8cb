"""Realignment W_a: from the last layer's hidden space back to the input-embedding space.

A latent step feeds the model its own last hidden state as the next input embedding. Hidden states
and input embeddings live in different spaces unless the embeddings are tied, so LatentMAS maps
them with the ridge solution of ``W_out W_a ~= W_in`` and rescales each vector to the typical
input-embedding norm (without the rescale, fed-back states drift off the embedding manifold).
"""

from __future__ import annotations

import torch
from torch import nn


class Realigner(nn.Module):
    def __init__(self, model: nn.Module, mode: str = "ridge", lam: float = 1e-5, trainable: bool = False):
        super().__init__()
        self.mode = mode
        w_in = model.get_input_embeddings().weight.detach().float()
        hidden = w_in.shape[1]
        if mode == "ridge":
            w_out = model.get_output_embeddings().weight.detach().float()
            gram = w_out.T @ w_out + lam * torch.eye(hidden, device=w_out.device)
            w_a = torch.linalg.solve(gram, w_out.T @ w_in)
        else:
            w_a = torch.eye(hidden, device=w_in.device)
        self.weight = nn.Parameter(w_a, requires_grad=trainable)
        self.register_buffer("target_norm", w_in.norm(dim=-1).mean())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return hidden
        mapped = hidden.float() @ self.weight
        mapped = mapped * (self.target_norm / mapped.norm(dim=-1, keepdim=True).clamp(min=1e-6))
        return mapped.to(hidden.dtype)
