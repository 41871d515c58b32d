"""The plugin math on its own: shapes, the untrained starting point, padding, short sequences."""

import pytest
import torch

from peft_variator.padding import PaddingContext, packed_sequences
from peft_variator.plugin import (
    DecompressionAdapter,
    compress,
    decompress,
    init_score,
    plan_groups,
    plan_packed_groups,
)

B, N, H = 3, 10, 8
# Left and right padding, and real lengths 9 and 5 that leave a token alone in its last group at ratio 4.
MIXED_PADDING = torch.tensor([[1] * 9 + [0] * 3, [0] * 7 + [1] * 5, [1] * 12])


def make_plugin(ratio: int, adapter_dim: int = 4, random: bool = True):
    score, adapter = init_score(ratio, H), DecompressionAdapter.create(H, adapter_dim)
    if random:
        with torch.no_grad():
            for parameter in [*score.parameters(), *(p for linear in adapter for p in linear.parameters())]:
                parameter.normal_(0.0, 0.3)
    return score, adapter


def test_compress_shortens_the_sequence_by_the_ratio_rounding_up():
    hidden = torch.randn(B, N, H)
    layout = plan_groups(N, 4)
    assert compress(hidden, layout, make_plugin(4)[0]).shape == (B, 3, H)
    assert compress(torch.randn(B, 12, H), plan_groups(12, 4)).shape == (B, 3, H)


def test_untrained_plugin_is_average_pooling_then_repetition():
    hidden = torch.randn(B, 12, H)
    layout = plan_groups(12, 4)
    score, adapter = make_plugin(4, random=False)
    compressed = compress(hidden, layout, score)
    torch.testing.assert_close(compressed, hidden.view(B, 3, 4, H).mean(dim=2))
    restored = decompress(compressed, hidden, layout, adapter)
    torch.testing.assert_close(restored, compressed.repeat_interleave(4, dim=1))


def test_compressed_vector_is_a_convex_combination_of_its_group():
    hidden = torch.randn(1, 4, H)
    score, _ = make_plugin(4)
    layout = plan_groups(4, 4)
    groups = hidden.view(1, 1, 4, H)
    weights = score(groups.reshape(1, 1, 4 * H)).softmax(-1)
    torch.testing.assert_close(compress(hidden, layout, score), (weights.unsqueeze(-1) * groups).sum(2))


def test_decompression_adds_a_per_token_correction():
    hidden = torch.randn(B, 8, H)
    layout = plan_groups(8, 4)
    score, adapter = make_plugin(4)
    ffn_output = torch.randn(B, 2, H)
    restored = decompress(ffn_output, hidden, layout, adapter)
    repeated = ffn_output.repeat_interleave(4, dim=1)
    assert not torch.allclose(restored, repeated)
    # The correction depends on each token's own input: tokens of one group differ.
    assert not torch.allclose(restored[:, 0], restored[:, 1])


def run_plugin(hidden, ratio, mask=None, seed_plugin=None, exact_tail=0):
    score, adapter = seed_plugin
    if mask is None and exact_tail:
        mask = torch.ones(hidden.shape[:2], dtype=torch.long)
    layout = plan_groups(hidden.shape[1], ratio, mask, exact_tail)
    # A stand-in FFN that mixes features, so errors in grouping show up.
    ffn = torch.nn.Sequential(torch.nn.Linear(H, 16), torch.nn.GELU(), torch.nn.Linear(16, H))
    torch.manual_seed(1)
    for parameter in ffn.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    return decompress(ffn(compress(hidden, layout, score)), hidden, layout, adapter)


@pytest.mark.parametrize("exact_tail", [0, 1, 3])
def test_padding_side_and_amount_do_not_change_real_token_outputs(exact_tail):
    plugin = make_plugin(4)
    lengths = [7, 3, 10]
    sequences = [torch.randn(1, n, H) for n in lengths]
    alone = [run_plugin(seq, 4, seed_plugin=plugin, exact_tail=exact_tail) for seq in sequences]
    for side in ("right", "left"):
        for width in (10, 13):
            batch = torch.full((3, width, H), 1e4)  # loud padding: it must not leak anywhere
            mask = torch.zeros(3, width, dtype=torch.long)
            for row, seq in enumerate(sequences):
                n = seq.shape[1]
                span = slice(0, n) if side == "right" else slice(width - n, width)
                batch[row, span], mask[row, span] = seq[0], 1
            out = run_plugin(batch, 4, mask, seed_plugin=plugin, exact_tail=exact_tail)
            assert torch.isfinite(out).all()
            for row, expected in enumerate(alone):
                torch.testing.assert_close(out[row][mask[row].bool()], expected[0], atol=1e-5, rtol=1e-5)


def test_packed_sequences_are_told_apart_where_the_position_does_not_go_up_by_one():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [5, 6, 7, 8, 9, 10, 11, 12, 13]])
    assert packed_sequences(positions).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2], [0] * 9]
    # One sequence per row (any offset), or positions that are not plain (batch, seq_len) indices: not packed.
    assert packed_sequences(positions[1:]) is None
    assert packed_sequences(torch.arange(9).expand(3, 1, 9)) is None
    assert packed_sequences(None) is None


@pytest.mark.parametrize("exact_tail", [0, 1, 3])
def test_sequences_packed_into_one_row_are_grouped_as_if_each_ran_alone(exact_tail):
    plugin = make_plugin(4)
    # Row 0 packs 7 + 9 tokens, row 1 packs 3 + 5 + 8: no group may reach across two sequences.
    packed = [[7, 9], [3, 5, 8]]
    sequences = [[torch.randn(1, n, H) for n in lengths] for lengths in packed]
    hidden = torch.stack([torch.cat(row, dim=1)[0] for row in sequences])
    sequence_index = torch.tensor([sum(([i] * n for i, n in enumerate(lengths)), []) for lengths in packed])
    layout = plan_packed_groups(sequence_index, 4, exact_tail)
    ffn = torch.nn.Sequential(torch.nn.Linear(H, 16), torch.nn.GELU(), torch.nn.Linear(16, H))
    score, adapter = plugin
    with torch.no_grad():
        out = decompress(ffn(compress(hidden, layout, score)), hidden, layout, adapter)
        for row, row_sequences in enumerate(sequences):
            start = 0
            for sequence in row_sequences:
                n = sequence.shape[1]
                mask = torch.ones(1, n, dtype=torch.long)
                alone_layout = plan_groups(n, 4, mask, exact_tail)
                alone = decompress(ffn(compress(sequence, alone_layout, score)), sequence, alone_layout, adapter)
                torch.testing.assert_close(out[row, start : start + n], alone[0], atol=1e-5, rtol=1e-5)
                start += n


def test_padded_slots_get_zero_weight():
    hidden = torch.randn(1, 6, H)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    layout = plan_groups(6, 4, mask)
    assert layout.slot_valid.tolist() == [[[True] * 4, [True, False, False, False]]]
    score, _ = make_plugin(4)
    hidden_with_other_pad = hidden.clone()
    hidden_with_other_pad[0, 5] = 123.0
    torch.testing.assert_close(compress(hidden, layout, score), compress(hidden_with_other_pad, layout, score))


def test_fully_padded_rows_and_short_sequences_are_finite():
    hidden = torch.randn(2, 3, H)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    out = run_plugin(hidden, 8, mask, seed_plugin=make_plugin(8))
    assert out.shape == (2, 3, H)
    assert torch.isfinite(out).all()


def test_a_token_alone_in_its_group_gets_the_exact_ffn_output():
    # 9 tokens at ratio 4: the 9th is alone in the third group, so it is not compressed and gets no correction.
    hidden = torch.randn(1, 9, H)
    score, adapter = make_plugin(4)
    layout = plan_groups(9, 4)
    compressed = compress(hidden, layout, score)
    torch.testing.assert_close(compressed[0, 2], hidden[0, 8])
    restored = decompress(compressed, hidden, layout, adapter)
    torch.testing.assert_close(restored[0, 8], compressed[0, 2])


def test_exact_last_token_puts_each_sequences_last_real_token_in_a_group_of_its_own():
    # Real lengths 9, 5 and 12 at ratio 4: 8 + 1, 4 + 1 and 11 + 1 tokens, so 2 + 1, 1 + 1 and 3 + 1 groups.
    layout = plan_groups(12, 4, MIXED_PADDING, exact_tail=1)
    assert layout.compressed_shape(3) == (1, 9)
    last_positions = [8, 11, 11]
    assert layout.token_alone.nonzero().tolist() == [[row, col] for row, col in enumerate(last_positions)]
    hidden = torch.randn(3, 12, H)
    score, adapter = make_plugin(4)
    ffn = torch.nn.Linear(H, H)
    restored = decompress(ffn(compress(hidden, layout, score)), hidden, layout, adapter)
    for row, col in enumerate(last_positions):
        torch.testing.assert_close(restored[row, col], ffn(hidden[row, col]))


def test_unpadded_layouts_are_made_on_the_requested_device():
    # The meta device stands in for a GPU: mixing its tensors with CPU ones fails just as CUDA does.
    score = make_plugin(4)[0].to("meta")
    for seq_len in (9, 10):  # a token alone in the last group; a partly empty last group
        layout = plan_groups(seq_len, 4, device="meta")
        masks = [layout.slot_valid, layout.token_alone, layout.group_alone]
        assert {mask.device.type for mask in masks if mask is not None} == {"meta"}
        hidden = torch.randn(2, seq_len, H, device="meta")
        assert decompress(compress(hidden, layout, score), hidden, layout).shape == (2, seq_len, H)


def test_the_padding_context_plans_one_layout_per_device():
    # A model split over several GPUs runs its layers on different devices within one forward.
    context = PaddingContext()
    context.record(None, batch_size=2)
    on_cpu = context.layout(2, 10, 4, False, torch.device("cpu"))
    on_meta = context.layout(2, 10, 4, False, torch.device("meta"))
    assert (on_cpu.slot_valid.device.type, on_meta.slot_valid.device.type) == ("cpu", "meta")


def test_sequence_shorter_than_ratio_forms_one_group():
    hidden = torch.randn(2, 3, H)
    layout = plan_groups(3, 8)
    assert layout.num_groups == 1
    compressed = compress(hidden, layout)
    torch.testing.assert_close(compressed[:, 0], hidden.mean(dim=1))


def test_decompression_is_repetition_plus_the_adapter_correction():
    hidden = torch.randn(B, 12, H)
    layout = plan_groups(12, 4)
    _, adapter = make_plugin(4)
    ffn_output = torch.randn(B, 3, H)
    expected = ffn_output.repeat_interleave(4, dim=1) + adapter.correction(ffn_output, hidden, layout)
    torch.testing.assert_close(decompress(ffn_output, hidden, layout, adapter), expected)


@pytest.mark.parametrize("exact_tail", [0, 1, 3, 6])
def test_padded_batches_follow_the_definition_token_by_token(exact_tail):
    mask = MIXED_PADDING
    hidden = torch.randn(3, 12, H)
    layout = plan_groups(12, 4, mask, exact_tail)
    _, adapter = make_plugin(4)
    ffn = torch.nn.Sequential(torch.nn.Linear(H, 16), torch.nn.GELU(), torch.nn.Linear(16, H))
    with torch.no_grad():
        restored = decompress(ffn(compress(hidden, layout)), hidden, layout, adapter)
        down_output, down_token, up = adapter
        for row in range(3):
            positions = mask[row].nonzero().flatten().tolist()
            # The last `exact_tail` real tokens form groups of their own.
            grouped = positions[: max(0, len(positions) - exact_tail)]
            for rank, position in enumerate(positions):
                start = rank // 4 * 4
                members = [position] if rank >= len(grouped) else grouped[start : start + 4]
                group_out = ffn(hidden[row, members].mean(dim=0))
                expected = group_out
                if len(members) > 1:
                    expected = group_out + up(torch.relu(down_output(group_out) + down_token(hidden[row, position])))
                torch.testing.assert_close(restored[row, position], expected, atol=1e-5, rtol=1e-5)


def test_padded_batches_run_the_ffn_on_real_groups_only():
    # Real lengths 9, 5 and 12 at ratio 4: 3 + 2 + 3 groups hold real tokens, of 3 x 3 planned.
    mask = MIXED_PADDING
    layout = plan_groups(12, 4, mask)
    assert compress(torch.randn(3, 12, H), layout).shape == (1, 8, H)


def test_a_batch_of_only_padding_is_finite():
    layout = plan_groups(5, 4, torch.zeros(2, 5, dtype=torch.long))
    hidden = torch.randn(2, 5, H)
    score, adapter = make_plugin(4)
    out = decompress(compress(hidden, layout, score), hidden, layout, adapter)
    assert out.shape == (2, 5, H) and torch.isfinite(out).all()


def test_decompression_in_mixed_precision_matches_full_precision():
    mask = MIXED_PADDING
    hidden = torch.randn(3, 12, H)
    layout = plan_groups(12, 4, mask)
    _, adapter = make_plugin(4)
    ffn_output = torch.randn(*layout.compressed_shape(3), H)
    full = decompress(ffn_output, hidden, layout, adapter)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = decompress(ffn_output, hidden, layout, adapter)
    real = mask.bool()
    torch.testing.assert_close(mixed.float()[real], full[real], atol=0.05, rtol=0.05)
