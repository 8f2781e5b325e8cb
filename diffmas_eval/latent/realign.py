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


# vocabulary rows per Gram-matrix chunk: a chunk's float32 copy is CHUNK_ROWS x hidden (256 MB at hidden 4096)
CHUNK_ROWS = 16384


@torch.no_grad()
def ridge_terms(w_out: torch.Tensor | None, w_in: torch.Tensor, scale: float, work: torch.dtype, device: torch.device,
                chunk: int = CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W_out^T W_out, W_out^T (scale W_in), mean row norm of scale W_in)`` in ``work`` precision on ``device``.

    Accumulated over vocabulary chunks, each chunk copied to ``device`` and cast on its own, so the only
    full-size tensors are the ``hidden x hidden`` accumulators: the one-shot product held two ``work`` copies of
    ``V x hidden`` (5 GB for Qwen3-8B), and an untied model split over GPUs (``device_map``) keeps ``lm_head`` on
    another device than the embedding, where ``w_out.T @ w_in`` cannot run at all. ``w_out`` None: the norm
    only (the two products come back as zeros)."""
    hidden = w_in.shape[1]
    gram = torch.zeros(hidden, hidden, dtype=work, device=device)
    cross = torch.zeros(hidden, hidden, dtype=work, device=device)
    norms = torch.zeros((), dtype=work, device=device)
    for start in range(0, w_in.shape[0], chunk):
        wi = w_in[start:start + chunk].to(device=device, dtype=work)
        if scale != 1.0:
            wi = wi * scale
        if w_out is not None:
            wo = w_out[start:start + chunk].to(device=device, dtype=work)
            gram += wo.T @ wo
            cross += wo.T @ wi
        norms += wi.norm(dim=-1).sum()
    return gram, cross, norms / w_in.shape[0]


class Realigner(nn.Module):
    """The map ``hidden -> input embedding`` (``mode``: ``ridge``, ``identity`` or ``none``), built on the input
    embedding's device: that is where latent vectors are consumed, so ``forward`` moves each hidden state
    there (from the last layer's device, on a split model) once, and W stays put."""

    def __init__(self, model: nn.Module, mode: str = "ridge", lam: float = 1e-5, trainable: bool = False,
                 target: str = "embedding_output"):
        super().__init__()
        if target not in CHOICES["realign_target"]:
            raise ValueError(f"realign_target={target!r} is not valid; choose one of "
                             f"{', '.join(CHOICES['realign_target'])}")
        self.mode = mode
        embedding = model.get_input_embeddings()
        w_in = embedding.weight.detach()
        # float32 whatever the model's dtype (bf16 would round the ridge solve and every mapped vector);
        # float64 for a float64 model, so a float64 reference chain is float64 throughout
        work = torch.float64 if w_in.dtype == torch.float64 else torch.float32
        device = w_in.device
        scale = embedding_scale(embedding) if target == "embedding_output" and mode != "none" else 1.0
        hidden = w_in.shape[1]
        w_out = model.get_output_embeddings().weight.detach() if mode == "ridge" else None
        gram, cross, target_norm = ridge_terms(w_out, w_in, scale, work, device)
        if mode == "ridge":
            w_a = torch.linalg.solve(gram + lam * torch.eye(hidden, dtype=work, device=device), cross)
        else:
            w_a = torch.eye(hidden, device=device, dtype=work)
        self.weight = nn.Parameter(w_a, requires_grad=trainable)
        self.register_buffer("target_norm", target_norm)
        self.input_scale = scale

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return hidden
        mapped = hidden.to(self.weight.device, self.weight.dtype) @ self.weight  # last layer -> first layer's device
        mapped = mapped * (self.target_norm / mapped.norm(dim=-1, keepdim=True).clamp(min=1e-6))
        return mapped.to(hidden.dtype)
