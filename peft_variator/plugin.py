"""Variator's compression and decompression as tensor functions, and the small modules that hold their weights.

Shapes: B batch, N tokens, H hidden size, k `ratio`, G = ceil(real tokens / k) groups.

The functions are loop-free (reshape, row selection, matmul), so they can be profiled, tested and compiled on
their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GroupLayout:
    """Which token goes into which group, for one batch and one ratio.

    Groups are formed over the *real* tokens of each sequence, in order, starting at its first real token, so the
    grouping (and hence every real token's output) does not depend on padding side or amount.

    Without padding, compressed tensors are `(B, G, D)`. With padding only the R groups that hold a real token are
    kept, packed into one `(1, R, D)` row list: the FFN and the group-level plugin work skip the empty groups at the
    end of shorter sequences (about a third of the groups of a served batch of mixed lengths).

    Attributes:
        ratio: tokens per group (k).
        seq_len: N, the sequence length of the hidden states.
        num_groups: G, groups per sequence (the longest sequence's).
        slot_row: `(R * k,)` long, the row of the flattened `(B * N, H)` hidden states feeding each slot of each
            kept group; `None` when nothing is packed (no padding). Rows, not per-element indices: selecting whole
            rows (`index_select`) copies memory an order of magnitude faster than `gather` does on CPU.
        slot_valid: `(1, G or R, k)` bool, which slots hold a real token; `None` when all do.
        token_row: `(B * N,)` long, the row of the packed `(R, D)` group vectors that each token gets back; `None`
            when nothing is packed and token n of every sequence is in its group n // k.
        token_alone: `(B or 1, N)` bool, tokens that are the only real token of their group; `None` when there are
            none. Such a group is not compressed, so these tokens get the exact FFN output and no adapter correction.
        group_alone: `(1, G or R)` bool, the groups of those tokens; `None` exactly when `token_alone` is.
    """

    ratio: int
    seq_len: int
    num_groups: int
    slot_row: torch.Tensor | None = None
    slot_valid: torch.Tensor | None = None
    token_row: torch.Tensor | None = None
    token_alone: torch.Tensor | None = None
    group_alone: torch.Tensor | None = None

    def compressed_shape(self, batch: int) -> tuple[int, int]:
        """The leading dimensions of compressed tensors for a batch of `batch` sequences: `(B, G)` or `(1, R)`."""
        if self.slot_row is None:
            return batch, self.num_groups
        return 1, self.slot_row.shape[0] // self.ratio


def plan_groups(
    seq_len: int,
    ratio: int,
    attention_mask: torch.Tensor | None = None,
    exact_tail: int = 0,
    device: torch.device | str | None = None,
) -> GroupLayout:
    """Group the tokens of a batch into runs of `ratio` consecutive real tokens.

    Args:
        seq_len: N.
        ratio: k.
        attention_mask: `(B, N)`, nonzero for real tokens; `None` when every token is real. Left, right or any other
            padding is allowed. Needed with `exact_tail` to know the batch size (all ones when unpadded).
        exact_tail: how many of each sequence's last real tokens get a group of their own, so their FFN outputs are
            exact; the real tokens before them are grouped. 1 with `exact_last_token`: in a decoder's prompt the last
            token is the one whose logits give the next token. More while training, to stand for generated tokens.
        device: where the layout's tensors go when there is no `attention_mask` (otherwise: the mask's device).
    """
    # Unpadded, the last token is alone in its group anyway when N = k * G + 1.
    tail_is_free = exact_tail == 0 or (exact_tail == 1 and seq_len % ratio == 1)
    if attention_mask is None:
        if not tail_is_free:
            raise ValueError("`exact_tail` needs the `attention_mask` (all ones when nothing is padded).")
        num_groups = -(-seq_len // ratio)
        tail = num_groups * ratio - seq_len
        if tail == 0:
            return GroupLayout(ratio, seq_len, num_groups)
        slot_valid = torch.ones(1, num_groups, ratio, dtype=torch.bool, device=device)
        slot_valid[:, -1, ratio - tail :] = False
        token_alone = group_alone = None
        if seq_len % ratio == 1:
            token_alone = torch.zeros(1, seq_len, dtype=torch.bool, device=device)
            token_alone[:, -1] = True
            group_alone = torch.zeros(1, num_groups, dtype=torch.bool, device=device)
            group_alone[:, -1] = True
        return GroupLayout(
            ratio, seq_len, num_groups, slot_valid=slot_valid, token_alone=token_alone, group_alone=group_alone
        )

    real = attention_mask.bool()
    device = real.device
    if tail_is_free and bool(real.all()):
        return plan_groups(seq_len, ratio, device=device)
    lengths = real.sum(dim=1, keepdim=True)
    # Every grouped real token takes the slot of its rank among the real tokens; each exact one takes the first slot
    # of a group of its own after them.
    grouped = (lengths - exact_tail).clamp(min=0)
    tail_start = -(-grouped // ratio) * ratio
    tail_length = lengths - grouped
    num_groups = max(1, int((tail_start // ratio + tail_length).max()))
    num_slots = num_groups * ratio
    # A stable sort of "is padding" lists each row's real positions first, in order.
    real_positions = torch.argsort((~real).to(torch.int8), dim=1, stable=True)
    slots = torch.arange(num_slots, device=device)
    in_tail = slots >= tail_start
    tail_rank = (slots - tail_start) // ratio
    opens_tail_group = ((slots - tail_start) % ratio == 0) & (tail_rank < tail_length)
    slot_is_real = torch.where(in_tail, opens_tail_group, slots < grouped)
    slot_rank = torch.where(in_tail, grouped + tail_rank, slots).clamp(max=real.shape[1] - 1)
    slot_token = torch.where(slot_is_real, real_positions.gather(1, slot_rank), 0)

    group_size = slot_is_real.view(-1, num_groups, ratio).sum(dim=2)
    kept = (group_size > 0).flatten()
    kept[0] |= ~kept.any()  # a batch of nothing but padding still hands the FFN one (empty) group
    kept_groups = kept.nonzero().squeeze(1)
    # Packed row of every (sequence, group); padding tokens borrow a real row (their outputs are never used).
    packed_row = (kept.long().cumsum(dim=0) - 1).clamp(min=0)

    sequence = torch.arange(real.shape[0], device=device)[:, None]
    rank = real.long().cumsum(dim=1) - 1
    token_slot = torch.where(rank < grouped, rank, tail_start + (rank - grouped) * ratio).clamp(min=0)
    token_group = (token_slot // ratio).clamp(max=num_groups - 1)
    token_alone = (group_size.gather(1, token_group) == 1) & real
    any_alone = bool(token_alone.any())
    kept_size = group_size.flatten()[kept_groups]
    return GroupLayout(
        ratio,
        seq_len,
        num_groups,
        slot_row=(slot_token + sequence * seq_len).view(-1, ratio)[kept_groups].flatten(),
        slot_valid=slot_is_real.view(-1, ratio)[kept_groups].unsqueeze(0),
        token_row=packed_row[(token_group + sequence * num_groups).flatten()],
        token_alone=token_alone if any_alone else None,
        group_alone=(kept_size == 1).unsqueeze(0) if any_alone else None,
    )


def plan_packed_groups(sequence_index: torch.Tensor, ratio: int, exact_tail: int = 0) -> GroupLayout:
    """Group the tokens of a padding-free batch, whose rows each hold several sequences one after another.

    Groups never reach across two sequences: each sequence is grouped (and gets its `exact_tail`) as if it were a row
    of its own. Planned as a padded batch of one row per sequence, then mapped back onto the packed rows.

    Args:
        sequence_index: `(B, N)`, nondecreasing along each row: which of the row's sequences each token belongs to
            (`packed_sequences`).
        ratio: k.
        exact_tail: as in `plan_groups`, for every sequence.
    """
    batch, seq_len = sequence_index.shape
    device = sequence_index.device
    starts = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    starts[:, 1:] = sequence_index[:, 1:] != sequence_index[:, :-1]
    starts = starts.flatten()
    sequence = starts.long().cumsum(dim=0) - 1
    first_token = starts.nonzero().squeeze(1)
    lengths = torch.bincount(sequence, minlength=first_token.shape[0])
    # One padding column more than the longest sequence, so `plan_groups` always packs (keeps row indices).
    width = int(lengths.max()) + 1
    token = torch.arange(batch * seq_len, device=device)
    one_per_row = sequence * width + (token - first_token[sequence])
    mask = torch.arange(width, device=device) < lengths[:, None]
    layout = plan_groups(width, ratio, mask, exact_tail)
    # Padding slots borrow row 0; `slot_valid` zeroes them.
    packed_row = torch.zeros(mask.numel(), dtype=torch.long, device=device)
    packed_row[one_per_row] = token
    token_alone = None if layout.token_alone is None else layout.token_alone.flatten()[one_per_row].view(batch, -1)
    return GroupLayout(
        ratio,
        seq_len,
        layout.num_groups,
        slot_row=packed_row[layout.slot_row],
        slot_valid=layout.slot_valid,
        token_row=layout.token_row[one_per_row],
        token_alone=token_alone,
        group_alone=layout.group_alone,
    )


def gather_groups(hidden: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """Arrange hidden states into groups: `(B, N, H)` -> `(B, G, k, H)` (`(1, R, k, H)` packed), zeros in empty
    slots."""
    batch, seq_len, width = hidden.shape
    num_slots = layout.num_groups * layout.ratio
    if layout.slot_row is not None:
        slots = hidden.reshape(batch * seq_len, width).index_select(0, layout.slot_row)
        # Padded positions must not reach the scoring map, which reads the whole concatenated group. In place: the
        # selected rows are a fresh tensor that autograd does not need back.
        slots.mul_(layout.slot_valid.reshape(-1, 1))
    elif num_slots > seq_len:
        slots = F.pad(hidden, (0, 0, 0, num_slots - seq_len))
    else:
        slots = hidden
    return slots.view(*layout.compressed_shape(batch), layout.ratio, width)


def group_weights(groups: torch.Tensor, layout: GroupLayout, score: nn.Linear | None) -> torch.Tensor:
    """Softmax weights of the tokens in each group: `(B, G, k, H)` -> `(B, G, k)`; empty slots get exactly 0.

    With `score=None` the weights are uniform over the real tokens (average pooling).
    """
    batch, num_groups, ratio, width = groups.shape
    if score is None:
        if layout.slot_valid is None:
            return groups.new_full((batch, num_groups, ratio), 1.0 / ratio)
        valid = layout.slot_valid.to(groups.dtype)
        return valid / valid.sum(dim=2, keepdim=True).clamp(min=1)
    scores = score(groups.reshape(batch, num_groups, ratio * width).to(score.weight.dtype))
    if layout.slot_valid is None:
        return scores.softmax(dim=-1).to(groups.dtype)
    # A finite fill keeps all-empty groups NaN-free (uniform, then zeroed by the mask).
    scores = scores.masked_fill(~layout.slot_valid, torch.finfo(scores.dtype).min)
    return (scores.softmax(dim=-1) * layout.slot_valid).to(groups.dtype)


def compress(hidden: torch.Tensor, layout: GroupLayout, score: nn.Linear | None = None) -> torch.Tensor:
    """Compress every group of k tokens into one vector: `(B, N, H)` -> `(B, G, H)` (`(1, R, H)` packed).

    The compressed vector is the softmax-weighted sum of the group's tokens, the weights coming from a linear map of
    the concatenated group (k*H -> k). `score=None` gives plain average pooling.
    """
    groups = gather_groups(hidden, layout)
    weights = group_weights(groups, layout, score)
    return (weights.unsqueeze(2) @ groups).squeeze(2)


def repeat_groups(compressed: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """Give every token its group's vector back: `(B, G, D)` (`(1, R, D)` packed) -> `(B, N, D)`."""
    batch, num_groups, width = compressed.shape
    if layout.token_row is not None:
        rows = compressed.reshape(batch * num_groups, width).index_select(0, layout.token_row)
        return rows.view(-1, layout.seq_len, width)
    repeated = compressed.unsqueeze(2).expand(batch, num_groups, layout.ratio, width)
    return repeated.reshape(batch, num_groups * layout.ratio, width)[:, : layout.seq_len]


class DecompressionAdapter(NamedTuple):
    """Bottleneck adapter over [repeated FFN output ; the token's own FFN input]: 2*H -> adapter_dim -> H.

    The down-projection of the concatenation is kept as its two halves so the half that reads the FFN output runs
    on the G compressed vectors before repetition, k times fewer rows than on the repeated ones. The three linear
    maps are held by the tuner layer, one `ModuleDict` each, like LoRA's A and B, so every checkpoint key has the
    `<module>.<adapter name>.<weight|bias>` shape that PEFT and transformers expect.
    """

    down_output: nn.Linear
    down_token: nn.Linear
    up: nn.Linear

    @classmethod
    def create(cls, hidden_size: int, adapter_dim: int) -> DecompressionAdapter:
        up = nn.Linear(adapter_dim, hidden_size)
        # Zero correction before training: decompression starts as plain repetition.
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        return cls(nn.Linear(hidden_size, adapter_dim), nn.Linear(hidden_size, adapter_dim, bias=False), up)

    def bottleneck(self, ffn_output: torch.Tensor, tokens: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
        """`(B, G, H)` FFN output and `(B, N, H)` FFN input -> `(B * N, adapter_dim)` activations."""
        dtype = self.up.weight.dtype
        from_output = repeat_groups(self.down_output(ffn_output.to(dtype)), layout)
        # addmm sums both halves of the down-projection inside one GEMM instead of in an extra pass.
        hidden = torch.addmm(
            from_output.reshape(-1, from_output.shape[-1]),
            tokens.reshape(-1, tokens.shape[-1]).to(dtype),
            self.down_token.weight.t(),
        )
        return hidden.relu_()

    def correction(self, ffn_output: torch.Tensor, tokens: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
        """`(B, G, H)` FFN output and `(B, N, H)` FFN input -> `(B, N, H)` correction."""
        return self.up(self.bottleneck(ffn_output, tokens, layout)).view(tokens.shape)


def decompress(
    ffn_output: torch.Tensor,
    tokens: torch.Tensor,
    layout: GroupLayout,
    adapter: DecompressionAdapter | None = None,
) -> torch.Tensor:
    """Bring the FFN output back to one vector per token: `(B, G, H)` + `(B, N, H)` -> `(B, N, H)`.

    Each token gets its group's FFN output plus the adapter's correction from its own FFN input `tokens`.
    `adapter=None` gives plain repetition.
    """
    if adapter is None:
        return repeat_groups(ffn_output, layout)
    # In-place accumulation bypasses autocast, so mixed precision takes the plain path below.
    if ffn_output.dtype == adapter.up.weight.dtype and not torch.is_autocast_enabled(ffn_output.device.type):
        # The up-projection's bias is added to the G group vectors before repetition and its product accumulates into
        # the repeated output inside the GEMM, so the plugin adds no pass over the (B, N, H) activations. A token
        # alone in its group gets neither: its group has no bias and its bottleneck row is zero.
        # `.contiguous()` copies only where the repetition is still a broadcast view, never `ffn_output` itself.
        bias = adapter.up.bias if layout.group_alone is None else adapter.up.bias * ~layout.group_alone[..., None]
        repeated = repeat_groups(ffn_output + bias, layout).contiguous()
        hidden = adapter.bottleneck(ffn_output, tokens, layout)
        if layout.token_alone is not None:
            hidden = (hidden.view(*tokens.shape[:2], -1) * ~layout.token_alone[..., None]).view(hidden.shape)
        return repeated.view(-1, repeated.shape[-1]).addmm_(hidden, adapter.up.weight.t()).view(tokens.shape)
    repeated = repeat_groups(ffn_output, layout)
    correction = adapter.correction(ffn_output, tokens, layout)
    if layout.token_alone is not None:
        correction = correction * ~layout.token_alone[..., None]
    return repeated + correction.to(repeated.dtype)


def init_score(ratio: int, hidden_size: int) -> nn.Linear:
    """The scoring map k*H -> k, zero-initialised so an untrained plugin is average pooling."""
    score = nn.Linear(ratio * hidden_size, ratio)
    nn.init.zeros_(score.weight)
    nn.init.zeros_(score.bias)
    return score
