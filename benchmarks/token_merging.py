"""Bipartite token merging before each FFN, in the style of ToMe (Bolya et al., "Token Merging: Your ViT But
Faster", ICLR 2023), written from the paper's description as a training-free baseline for Variator.

Each round splits the tokens alternately into sets A and B, matches every A token to its most similar B token
(cosine similarity of the hidden states), and merges the r best-matched A tokens into their B partners (size-weighted
mean). The FFN runs on the merged tokens; afterwards every original token takes the output of the token it was
merged into. Rounds halve the sequence at most, so ratio k uses log2(k) rounds of r = N/2.

Only used by the benchmarks: `merge_before_ffns(model)` patches the Variator layers of a model (their plugins are
ignored) so the same FFN wiring serves both methods.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from layer_patches import replaced_forwards

from peft_variator.layer import VariatorFFN, VariatorFFNInput, VariatorFFNOutput


def merge_round(x: torch.Tensor, sizes: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One bipartite merge: `(B, N, H)` tokens with `(B, N)` sizes -> `(B, N - r, H)`, their sizes, and `(B, N)`
    the merged index of every input token."""
    batch, length, width = x.shape
    a, b = x[:, ::2], x[:, 1::2]
    num_a = a.shape[1]
    r = min(r, num_a)
    similarity = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(1, 2)
    best, partner = similarity.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    merged_a, kept_a = order[:, :r], order[:, r:]
    destination = partner.gather(1, merged_a)

    size_a, size_b = sizes[:, ::2], sizes[:, 1::2]
    weighted_b = b * size_b[..., None]
    weighted_b = weighted_b.scatter_add(
        1,
        destination[..., None].expand(batch, r, width),
        (a * size_a[..., None]).gather(1, merged_a[..., None].expand(batch, r, width)),
    )
    new_size_b = size_b.scatter_add(1, destination, size_a.gather(1, merged_a))
    kept = a.gather(1, kept_a[..., None].expand(batch, num_a - r, width))
    merged = torch.cat([kept, weighted_b / new_size_b[..., None]], dim=1)
    new_sizes = torch.cat([size_a.gather(1, kept_a), new_size_b], dim=1)

    # Where every input token went: kept A tokens first, then B tokens (with the A tokens merged into them).
    index_a = torch.empty_like(partner)
    index_a.scatter_(1, kept_a, torch.arange(num_a - r, device=x.device).expand(batch, -1))
    index_a.scatter_(1, merged_a, num_a - r + destination)
    index_b = num_a - r + torch.arange(length - num_a, device=x.device).expand(batch, -1)
    index = torch.empty(batch, length, dtype=torch.long, device=x.device)
    index[:, ::2], index[:, 1::2] = index_a, index_b
    return merged, new_sizes, index


def merge_tokens(x: torch.Tensor, ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge `(B, N, H)` down to about N / ratio tokens; returns them and `(B, N)` each token's merged index."""
    sizes = x.new_ones(x.shape[:2])
    index = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    for _ in range(round(math.log2(ratio))):
        if x.shape[1] < 2:
            break
        x, sizes, step = merge_round(x, sizes, x.shape[1] // 2)
        index = step.gather(1, index)
    return x, index


def unmerge_tokens(merged: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Every original token takes its merged token's vector: `(B, M, H)` -> `(B, N, H)`."""
    return merged.gather(1, index[..., None].expand(*index.shape, merged.shape[-1]))


def _ffn(self, hidden, *args, **kwargs):
    if hidden.shape[1] == 1:
        return self.base_layer(hidden, *args, **kwargs)
    merged, index = merge_tokens(hidden, self.ratio[self.active_plugin()])
    return unmerge_tokens(self.base_layer(merged, *args, **kwargs), index)


def _input(self, hidden, *args, **kwargs):
    merged, index = merge_tokens(hidden, self.ratio[self.active_plugin()])
    self.state.put(index, None)
    return self.base_layer(merged, *args, **kwargs)


def _output(self, intermediate, *args, **kwargs):
    index, _ = self.state.take()
    return unmerge_tokens(self.base_layer(intermediate, *args, **kwargs), index)


def merge_before_ffns(model: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
    """Within the block, every Variator layer of `model` merges tokens ToMe-style at its active adapter's ratio
    instead of running its plugin. Batches must not hold padding (evaluate padded data one sequence at a time)."""
    return replaced_forwards(model, {VariatorFFN: _ffn, VariatorFFNInput: _input, VariatorFFNOutput: _output})
