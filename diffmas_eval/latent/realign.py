"""Realignment W_a: from the last layer's hidden space back to what the model feeds its first layer.

A latent step feeds the model its own last hidden state as the next input embedding. Hidden states
and input embeddings live in different spaces unless the embeddings are tied, so LatentMAS maps
them with the ridge solution of ``W_out W_a ~= E`` and rescales each vector to the typical norm of
``E`` (without the rescale, fed-back states drift off the embedding manifold).

``E`` is what the first decoder layer really receives for a token: the *output* of the model's
input-embedding module. For most models that is the weight matrix itself; some families (Gemma 2
and 3) multiply inside the module by sqrt(hidden_size), and ``inputs_embeds`` skip that module,
so targeting the weight rows would feed latent vectors at 1/sqrt(hidden) of a token's norm. The
module's scale is measured, not looked up per family; a module that does more than scale its rows
is refused. ``realign_target=weight_rows`` keeps the old meaning for chains saved before the target existed.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import CHOICES


@torch.no_grad()
def embedding_scale(embedding: nn.Module, probe: int = 512) -> float:
    """The scalar ``s`` with ``embedding(ids) == s * embedding.weight[ids]`` (1.0 when they are equal)."""
    weight = embedding.weight
    ids = torch.linspace(0, weight.shape[0] - 1, steps=min(probe, weight.shape[0]), device=weight.device).long()
    out, rows = embedding(ids), weight[ids]
    if torch.equal(out, rows):
        return 1.0
    out, rows = out.float(), rows.float()
    scale = float((out * rows).sum() / (rows * rows).sum())
    if not torch.allclose(out, scale * rows, rtol=1e-2, atol=1e-3 * float(out.abs().max())):
        raise ValueError(f"{type(embedding).__name__} does more than scale its weight rows, so latent vectors "
                         "cannot be matched to its output; use realign=none (or realign_target=weight_rows)")
    return scale


class Realigner(nn.Module):
    def __init__(self, model: nn.Module, mode: str = "ridge", lam: float = 1e-5, trainable: bool = False,
                 target: str = "embedding_output"):
        super().__init__()
        if target not in CHOICES["realign_target"]:
            raise ValueError(f"realign_target={target!r} is not valid; choose one of "
                             f"{', '.join(CHOICES['realign_target'])}")
        self.mode = mode
        embedding = model.get_input_embeddings()
        # float32 whatever the model's dtype (bf16 would round the ridge solve and every mapped vector);
        # float64 for a float64 model, so a float64 reference chain is float64 throughout
        work = torch.float64 if embedding.weight.dtype == torch.float64 else torch.float32
        w_in = embedding.weight.detach().to(work)
        scale = embedding_scale(embedding) if target == "embedding_output" and mode != "none" else 1.0
        if scale != 1.0:
            w_in = w_in * scale
        hidden = w_in.shape[1]
        if mode == "ridge":
            w_out = model.get_output_embeddings().weight.detach().to(work)
            gram = w_out.T @ w_out + lam * torch.eye(hidden, device=w_out.device)
            w_a = torch.linalg.solve(gram, w_out.T @ w_in)
        else:
            w_a = torch.eye(hidden, device=w_in.device, dtype=work)
        self.weight = nn.Parameter(w_a, requires_grad=trainable)
        self.register_buffer("target_norm", w_in.norm(dim=-1).mean())
        self.input_scale = scale

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return hidden
        mapped = hidden.to(self.weight.device, self.weight.dtype) @ self.weight  # last layer -> first layer's device
        mapped = mapped * (self.target_norm / mapped.norm(dim=-1, keepdim=True).clamp(min=1e-6))
        return mapped.to(hidden.dtype)
