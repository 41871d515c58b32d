"""Every supported architecture, from a tiny randomly initialised config: the right FFNs are found without
`target_modules`, padding does not change real tokens, and generation works."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_plugins
from peft import get_peft_model
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BertConfig,
    BertForMultipleChoice,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    DataCollatorWithFlattening,
    DistilBertConfig,
    ElectraConfig,
    EncoderDecoderConfig,
    EncoderDecoderModel,
    FNetConfig,
    FNetModel,
    FunnelBaseModel,
    FunnelConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    MT5Config,
    OPTConfig,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLTextConfig,
    Qwen2VLVisionConfig,
    RobertaConfig,
    T5Config,
    XLMRobertaConfig,
    XLNetConfig,
)

from peft_variator import VariatorConfig
from peft_variator.architectures import FFN_LOCATIONS, find_ffns, layer_index
from peft_variator.layer import VariatorFFN, VariatorFFNInput, VariatorFFNOutput, VariatorLayer

H, FFN_DIM, LAYERS = 32, 64, 2
ENCODER = dict(
    vocab_size=100, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=FFN_DIM
)
DECODER = dict(
    vocab_size=100,
    hidden_size=H,
    intermediate_size=FFN_DIM,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=0,
)

ENCODERS = {
    "bert": BertConfig(**ENCODER),
    "roberta": RobertaConfig(**ENCODER, pad_token_id=1),
    "xlm-roberta": XLMRobertaConfig(**ENCODER, pad_token_id=1),
    "electra": ElectraConfig(**ENCODER, embedding_size=H),
    "distilbert": DistilBertConfig(vocab_size=100, dim=H, hidden_dim=FFN_DIM, n_layers=LAYERS, n_heads=4),
}
DECODERS = {
    "llama": LlamaConfig(**DECODER),
    "mistral": MistralConfig(**DECODER),
    "qwen2": Qwen2Config(**DECODER),
    "gpt2": GPT2Config(vocab_size=100, n_embd=H, n_inner=FFN_DIM, n_layer=LAYERS, n_head=4, pad_token_id=0),
    # Found by structure (no table entry); flattens the tokens to (B * N, H) before fc1 / fc2.
    "opt": OPTConfig(
        vocab_size=100, hidden_size=H, ffn_dim=FFN_DIM, num_hidden_layers=LAYERS, num_attention_heads=4, pad_token_id=0
    ),
}
T5_SIZES = dict(
    vocab_size=100, d_model=H, d_ff=FFN_DIM, d_kv=8, num_layers=LAYERS, num_heads=4, decoder_start_token_id=0
)
SEQ2SEQ = {
    "t5": T5Config(
        vocab_size=100, d_model=H, d_ff=FFN_DIM, d_kv=8, num_layers=LAYERS, num_heads=4, decoder_start_token_id=0
    ),
    "mt5": MT5Config(
        vocab_size=100, d_model=H, d_ff=FFN_DIM, d_kv=8, num_layers=LAYERS, num_heads=4, decoder_start_token_id=0
    ),
}


def wrapped(model) -> dict[str, type]:
    return {name: type(module) for name, module in model.named_modules() if isinstance(module, VariatorLayer)}


def variator(model, ratio=2, **kwargs):
    peft_model = get_peft_model(model, VariatorConfig(ratio=ratio, **kwargs))
    randomize_plugins(peft_model)
    return peft_model.eval()


@pytest.mark.parametrize("model_type", sorted(ENCODERS))
def test_encoder_ffns_are_found_by_model_type(model_type):
    model = variator(AutoModel.from_config(ENCODERS[model_type]))
    kinds = sorted(wrapped(model).values(), key=lambda cls: cls.__name__)
    if model_type == "distilbert":
        assert kinds == [VariatorFFN] * LAYERS
    else:
        assert kinds == [VariatorFFNInput] * LAYERS + [VariatorFFNOutput] * LAYERS


@pytest.mark.parametrize("model_type", sorted(ENCODERS))
def test_encoder_real_tokens_do_not_depend_on_batch_padding(model_type):
    model = variator(AutoModel.from_config(ENCODERS[model_type]), ratio=4)
    lengths = [9, 4, 13]
    sequences = [torch.randint(3, 100, (n,)) for n in lengths]
    width = max(lengths) + 3
    ids = torch.full((3, width), 0)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)], mask[row, : len(seq)] = seq, 1
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).last_hidden_state
        for row, seq in enumerate(sequences):
            alone = model(input_ids=seq[None], attention_mask=torch.ones(1, len(seq), dtype=torch.long))
            torch.testing.assert_close(batched[row, : len(seq)], alone.last_hidden_state[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(batched).all()


@pytest.mark.parametrize("exact_last_token", [True, False])
@pytest.mark.parametrize("model_type", sorted(DECODERS))
def test_decoder_mlps_are_found_and_left_padded_prompts_match_unpadded(model_type, exact_last_token):
    base = AutoModelForCausalLM.from_config(DECODERS[model_type])
    model = variator(base, ratio=4, exact_last_token=exact_last_token)
    expected = [VariatorFFNInput, VariatorFFNOutput] if model_type == "opt" else [VariatorFFN]
    assert list(wrapped(model).values()) == expected * LAYERS
    lengths = [10, 5]
    sequences = [torch.randint(3, 100, (n,)) for n in lengths]
    ids = torch.zeros(2, 10, dtype=torch.long)
    mask = torch.zeros(2, 10, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, 10 - len(seq) :], mask[row, 10 - len(seq) :] = seq, 1
    # Positions count real tokens only, as `generate()` computes them for left padding.
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        for row, seq in enumerate(sequences):
            alone = model(input_ids=seq[None]).logits[0]
            torch.testing.assert_close(batched[row, 10 - len(seq) :], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_padding_free_batches_give_each_packed_sequence_its_own_output(model_type):
    # `DataCollatorWithFlattening` packs a batch into one row told apart by `position_ids` alone; transformers'
    # attention keeps the sequences apart (without a cache), and so must the plugins' groups.
    model = variator(AutoModelForCausalLM.from_config(DECODERS[model_type]), ratio=4)
    sequences = [torch.randint(3, 100, (n,)).tolist() for n in (7, 10, 5)]
    packed = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": ids} for ids in sequences])
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        start = 0
        for ids in sequences:
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(logits[0, start : start + len(ids)], alone, atol=1e-5, rtol=1e-5)
            start += len(ids)


@pytest.mark.parametrize("model_type", sorted(DECODERS))
def test_decoder_generate_uses_the_cache_and_disable_adapter_matches_the_base(model_type):
    base = AutoModelForCausalLM.from_config(DECODERS[model_type]).eval()
    prompt = torch.randint(3, 100, (2, 12))
    mask = torch.ones_like(prompt)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    reference = base.generate(input_ids=prompt, attention_mask=mask, **settings)
    model = variator(base, ratio=4, task_type="CAUSAL_LM")
    compressed = model.generate(input_ids=prompt, attention_mask=mask, **settings)
    assert compressed.shape == reference.shape
    with model.disable_adapter():
        assert torch.equal(model.generate(input_ids=prompt, attention_mask=mask, **settings), reference)


def test_flattened_tokens_are_regrouped_per_sequence_and_compressed():
    # OPT hands its FFN (B * N, H): compressing must group within each sequence, never across two.
    base = AutoModelForCausalLM.from_config(DECODERS["opt"]).eval()
    prompt = torch.randint(3, 100, (3, 10))
    with torch.no_grad():
        reference = base(input_ids=prompt).logits
        model = variator(base, ratio=4)
        compressed = model(input_ids=prompt).logits
        rows = [model(input_ids=prompt[row : row + 1]).logits[0] for row in range(3)]
    assert not torch.allclose(compressed, reference)
    torch.testing.assert_close(compressed, torch.stack(rows), atol=1e-5, rtol=1e-5)


def test_causal_lms_keep_the_last_prompt_token_exact_unless_told_otherwise(tmp_path):
    for model_type in ("llama", "gpt2"):  # LlamaForCausalLM, GPT2LMHeadModel
        base = AutoModelForCausalLM.from_config(DECODERS[model_type])
        assert get_peft_model(base, VariatorConfig()).peft_config["default"].exact_last_token is True
    # The resolved value is what gets saved, so a loaded adapter runs as it was trained.
    get_peft_model(AutoModelForCausalLM.from_config(DECODERS["llama"]), VariatorConfig()).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["exact_last_token"] is True
    encoder = AutoModel.from_config(ENCODERS["bert"])
    assert get_peft_model(encoder, VariatorConfig()).peft_config["default"].exact_last_token is False
    explicit = VariatorConfig(exact_last_token=False)
    base = AutoModelForCausalLM.from_config(DECODERS["llama"])
    assert get_peft_model(base, explicit).peft_config["default"].exact_last_token is False


def test_a_causal_lm_class_transformers_does_not_list_still_counts_as_one():
    # Remote code and subclasses have names of their own; `*ForCausalLM` says what they are.
    from transformers import LlamaForCausalLM

    class CustomForCausalLM(LlamaForCausalLM):
        pass

    model = get_peft_model(CustomForCausalLM(DECODERS["llama"]), VariatorConfig())
    assert model.peft_config["default"].exact_last_token is True


def test_the_last_prompt_token_gets_the_exact_ffn_output():
    model = variator(AutoModelForCausalLM.from_config(DECODERS["llama"]), ratio=4)
    mlp = model.base_model.model.model.layers[1].mlp
    seen = {}
    handle = mlp.register_forward_hook(lambda module, args, output: seen.update(inputs=args[0], output=output))
    # 11 = 4 + 4 + 3: without the option the last token would share a group with the two before it.
    prompt = torch.randint(3, 100, (2, 11))
    with torch.no_grad():
        model(input_ids=prompt)
        handle.remove()
        exact = mlp.get_base_layer()(seen["inputs"])
    torch.testing.assert_close(seen["output"][:, -1], exact[:, -1])
    assert not torch.allclose(seen["output"][:, -2], exact[:, -2])


def test_single_token_decode_steps_run_uncompressed():
    base = AutoModelForCausalLM.from_config(DECODERS["llama"]).eval()
    model = variator(base, ratio=4)
    token = torch.randint(3, 100, (2, 1))
    with torch.no_grad():
        with_plugins = model(input_ids=token).logits
        with model.disable_adapter():
            without = model(input_ids=token).logits
    assert torch.equal(with_plugins, without)


def test_every_position_whose_logits_are_kept_runs_exact():
    """`logits_to_keep=m` (what `generate()` passes) reads the last m positions: all of them run exact, and the
    tokens before are grouped as without them, so the last prompt token's logits do not depend on what follows."""
    base = AutoModelForCausalLM.from_config(DECODERS["llama"]).eval()
    model = variator(base, ratio=4)
    prompt, candidates = torch.randint(3, 100, (1, 18)), torch.randint(3, 100, (1, 6))
    with torch.no_grad():
        alone = model(input_ids=prompt, logits_to_keep=1).logits[:, -1]
        followed = model(input_ids=torch.cat([prompt, candidates], dim=1), logits_to_keep=7).logits[:, 0]
        # A later call keeping every logit is compressed again (nothing carried over from the call before).
        everything = model(input_ids=torch.cat([prompt, candidates], dim=1)).logits[:, -7]
    torch.testing.assert_close(followed, alone)
    assert not torch.allclose(everything, alone)


def test_a_forward_interrupted_by_ctrl_c_leaves_later_calls_as_on_a_fresh_model():
    base = AutoModelForCausalLM.from_config(DECODERS["llama"]).eval()
    model = variator(base, ratio=4)
    fresh = copy.deepcopy(model)
    ids = torch.randint(3, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0

    def interrupt(*_):
        raise KeyboardInterrupt

    handle = model.get_submodule("base_model.model.model.layers.0").register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        model(input_ids=ids, attention_mask=mask, logits_to_keep=6)
    handle.remove()
    with torch.no_grad():
        for call in (dict(input_ids=ids[:1]), dict(input_ids=ids, attention_mask=torch.ones_like(ids))):
            torch.testing.assert_close(model(**call).logits, fresh(**call).logits)


def test_prompt_lookup_decoding_generates_what_plain_greedy_decoding_does():
    """Assisted and prompt-lookup decoding verify several candidate tokens per forward, prefill included."""
    base = AutoModelForCausalLM.from_config(DECODERS["llama"]).eval()
    model = variator(base, ratio=4)
    settings = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        start = model.generate(input_ids=torch.randint(3, 100, (1, 6)), **settings)
        prompt = torch.cat([start, start], dim=1)  # repeats, so lookup finds candidates
        plain = model.generate(input_ids=prompt, **settings)
        lookup = model.generate(input_ids=prompt, prompt_lookup_num_tokens=5, **settings)
    torch.testing.assert_close(lookup, plain)


@pytest.mark.parametrize("model_type", sorted(SEQ2SEQ))
def test_t5_compresses_the_encoder_only_and_generates(model_type):
    base = AutoModelForSeq2SeqLM.from_config(SEQ2SEQ[model_type]).eval()
    prompt = torch.randint(3, 100, (2, 9))
    mask = torch.ones_like(prompt)
    mask[1, 6:] = 0
    reference = base.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=5, do_sample=False)
    model = variator(base, ratio=2, task_type="SEQ_2_SEQ_LM")
    names = list(wrapped(model))
    assert len(names) == LAYERS and all(".encoder.block." in name and "DenseReluDense" in name for name in names)
    encoder_out = model.get_encoder()(input_ids=prompt, attention_mask=mask).last_hidden_state
    with model.disable_adapter():
        assert not torch.allclose(encoder_out, base.get_encoder()(input_ids=prompt, attention_mask=mask)[0])
        assert torch.equal(
            model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=5, do_sample=False), reference
        )
    generated = model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert generated.shape[0] == 2


def test_unknown_architecture_ffns_are_found_by_structure_and_logged(caplog):
    config = GPTNeoXConfig(
        vocab_size=100, hidden_size=H, intermediate_size=FFN_DIM, num_hidden_layers=LAYERS, num_attention_heads=4
    )
    assert config.model_type not in FFN_LOCATIONS
    base = AutoModelForCausalLM.from_config(config).eval()
    prompt = torch.randint(3, 100, (2, 10))
    with torch.no_grad():
        reference = base(input_ids=prompt).logits
    with caplog.at_level(logging.INFO, logger="peft_variator"):
        model = variator(base, ratio=2)
    assert wrapped(model) == {f"base_model.model.gpt_neox.layers.{i}.mlp": VariatorFFN for i in range(LAYERS)}
    assert "found 2 FFNs by structure" in caplog.text
    with torch.no_grad():
        compressed = model(input_ids=prompt).logits
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=prompt).logits, reference)
    assert compressed.shape == reference.shape and not torch.allclose(compressed, reference)


@pytest.mark.parametrize("model_type", ["bert", "gpt_neox", "opt"])
def test_layers_to_transform_selects_layers_whether_ffns_come_from_the_table_or_by_structure(model_type):
    """BERT's FFNs come from the `model_type` table (regex targets), GPT-NeoX's whole FFN block and OPT's two
    linears are found by structure (full module names); PEFT itself would apply `layers_to_transform` to none of
    them."""
    configs = {
        "bert": BertConfig(vocab_size=100, hidden_size=H, intermediate_size=FFN_DIM, num_attention_heads=4),
        "gpt_neox": GPTNeoXConfig(vocab_size=100, hidden_size=H, intermediate_size=FFN_DIM, num_attention_heads=4),
        "opt": OPTConfig(vocab_size=100, hidden_size=H, ffn_dim=FFN_DIM, num_attention_heads=4),
    }
    config = configs[model_type]
    config.num_hidden_layers = 3
    model = variator(AutoModel.from_config(config), ratio=2, layers_to_transform=[0, 2])
    assert {layer_index(name, None) for name in wrapped(model)} == {0, 2}


@pytest.mark.parametrize("layers_pattern", [None, "layers"])
def test_layers_to_transform_applies_to_suffix_targets_in_a_layer_list_at_the_root(layers_pattern):
    """A bare `LlamaModel` names its FFNs `layers.<i>.mlp`: PEFT's own layer rule finds no index there and would
    match nothing."""
    base = AutoModel.from_config(DECODERS["llama"])
    model = variator(base, target_modules=["mlp"], layers_to_transform=[1], layers_pattern=layers_pattern)
    assert list(wrapped(model)) == ["base_model.model.layers.1.mlp"]


def left_padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 11 token ids; the first is left-padded, its real tokens are its last 7."""
    ids = torch.randint(3, 100, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    return ids, mask


# Model types outside the table, each FFN a different shape: BERT-style halves nested in `intermediate` / `output`
# (CamemBERT, DeBERTa-v2, ESM), gate and up projections fused into one Linear (Phi-3), an FFN whose forward adds the
# residual it is given (BLOOM).
FOUND_BY_STRUCTURE = {
    "camembert": ("encoder.layer.0.intermediate.dense", dict(pad_token_id=1)),
    "deberta-v2": ("encoder.layer.0.intermediate.dense", {}),
    "esm": ("encoder.layer.0.intermediate.dense", dict(pad_token_id=1, position_embedding_type="rotary")),
    "phi3": ("model.layers.0.mlp", dict(num_key_value_heads=2, pad_token_id=0)),
    "bloom": ("transformer.h.0.mlp.dense_h_to_4h", dict(n_layer=LAYERS, n_head=4, pad_token_id=0)),
}


@pytest.mark.parametrize("model_type", sorted(FOUND_BY_STRUCTURE))
def test_ffns_of_other_shapes_are_found_by_structure_and_real_tokens_ignore_padding(model_type):
    first_target, extra = FOUND_BY_STRUCTURE[model_type]
    config = AutoConfig.for_model(model_type, **{**ENCODER, **extra})
    causal = model_type in ("phi3", "bloom")
    base = (AutoModelForCausalLM if causal else AutoModel).from_config(config).eval()
    model = variator(base, ratio=3)
    assert f"base_model.model.{first_target}" in wrapped(model)
    ids = torch.randint(3, 100, (2, 11))
    mask = torch.ones_like(ids)
    real = slice(4, None) if causal else slice(0, 7)  # left padding for decoders, right for encoders
    mask[0] = 0
    mask[0, real] = 1
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask)
        alone = model(input_ids=ids[:1, real])
    key = "logits" if causal else "last_hidden_state"
    torch.testing.assert_close(padded[key][0, real], alone[key][0], rtol=0, atol=1e-5)


# Decoder layers holding more than their FFN that is shaped hidden -> r -> hidden: Gemma 3n's LAUREL block (a low-rank
# residual, r = `laurel_rank`) and the per-layer-input gate and projection of Gemma 3n and Gemma 4, which multiply in a
# per-token input between them.
BESIDE_THE_FFN = dict(
    DECODER, head_dim=8, sliding_window=16, layer_types=["sliding_attention", "full_attention"], num_kv_shared_layers=0
)
GEMMA_PER_LAYER_INPUTS = {
    "gemma3n_text": dict(
        BESIDE_THE_FFN,
        vocab_size_per_layer_input=100,
        hidden_size_per_layer_input=16,
        laurel_rank=4,
        altup_num_inputs=2,
        activation_sparsity_pattern=[0.0] * LAYERS,
    ),
    "gemma4_text": dict(
        BESIDE_THE_FFN, vocab_size_per_layer_input=100, hidden_size_per_layer_input=16, global_head_dim=8
    ),
}


@pytest.mark.parametrize("model_type", sorted(GEMMA_PER_LAYER_INPUTS))
def test_only_the_ffn_is_found_beside_low_rank_blocks_and_per_token_gates(model_type):
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **GEMMA_PER_LAYER_INPUTS[model_type]))
    assert_compresses_only(base.eval(), [f"model.layers.{i}.mlp" for i in range(LAYERS)])


def assert_compresses_only(base: torch.nn.Module, targets: list[str]) -> None:
    """Variator on the causal LM `base` wraps exactly `targets` (whole FFNs); left padding does not change real
    tokens' logits; `disable_adapter()` gives the base model's logits and greedy tokens."""
    ids, mask = left_padded_prompts()
    with torch.no_grad():
        reference = base(input_ids=ids, attention_mask=mask).logits
        reference_tokens = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    model = variator(base, ratio=3)
    assert wrapped(model) == {f"base_model.model.{target}": VariatorFFN for target in targets}
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[:1, 4:]).logits
        with model.disable_adapter():
            uncompressed = model(input_ids=ids, attention_mask=mask).logits
            uncompressed_tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(padded[0, 4:], alone[0], rtol=0, atol=1e-5)
    assert not torch.allclose(padded, reference)
    torch.testing.assert_close(uncompressed, reference)
    assert torch.equal(uncompressed_tokens, reference_tokens) and tokens.shape == reference_tokens.shape


# Mixture-of-experts blocks, whose routed experts transformers stacks into 3-D weights: Mixtral (router + experts),
# Qwen2-MoE (and a shared expert with its own gate), GPT-OSS (per-expert biases; the block also returns its router
# scores), JetMoE (experts inside attention too, which are not an FFN); DBRX lays all experts' matrices end to end in
# `(num_experts * intermediate, hidden)` parameters next to a Linear router.
EXPERTS = dict(num_experts_per_tok=2)
MIXTURES_OF_EXPERTS = {
    "mixtral": dict(**DECODER, **EXPERTS, num_local_experts=4),
    "qwen2_moe": dict(
        **DECODER, **EXPERTS, num_experts=4, moe_intermediate_size=48, shared_expert_intermediate_size=40
    ),
    "gpt_oss": dict(**DECODER, **EXPERTS, num_local_experts=4, head_dim=8),
    "jetmoe": dict(**DECODER, **EXPERTS, num_local_experts=4, kv_channels=16),
    "dbrx": dict(
        vocab_size=100,
        d_model=H,
        n_layers=LAYERS,
        n_heads=4,
        max_seq_len=64,
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=FFN_DIM, moe_num_experts=4, moe_top_k=2),
    ),
}
EXPERT_BLOCKS = {"dbrx": "transformer.blocks.{}.ffn"}  # the others: model.layers.{}.mlp


def mixture_of_experts(model_type: str):
    config = AutoConfig.for_model(model_type, **MIXTURES_OF_EXPERTS[model_type])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", sorted(MIXTURES_OF_EXPERTS))
def test_mixture_of_experts_blocks_are_compressed_whole_and_left_padding_does_not_change_real_tokens(model_type):
    block = EXPERT_BLOCKS.get(model_type, "model.layers.{}.mlp")
    assert_compresses_only(mixture_of_experts(model_type), [block.format(i) for i in range(LAYERS)])


@pytest.mark.parametrize("model_type", sorted(MIXTURES_OF_EXPERTS))
def test_router_logits_come_per_token_so_the_load_balancing_loss_runs_on_padded_batches(model_type):
    """`output_router_logits=True` (the load-balancing loss reads them against the call's attention mask): each token
    gets its group's router logits, so they have the base model's shape and a real token's do not depend on
    padding."""
    base = mixture_of_experts(model_type)
    ids, mask = left_padded_prompts()
    with torch.no_grad():
        reference = base(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits
        model = variator(base, ratio=3)
        padded = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
        alone = model(input_ids=ids[:1, 4:], output_router_logits=True)
    assert [logits.shape for logits in padded.router_logits] == [logits.shape for logits in reference]
    if getattr(padded, "aux_loss", None) is not None:
        assert torch.isfinite(padded.aux_loss)
    grouped = 0
    for padded_logits, alone_logits in zip(padded.router_logits, alone.router_logits, strict=True):
        real = padded_logits.reshape(2, 11, -1)[0, 4:]
        torch.testing.assert_close(real, alone_logits.reshape(7, -1), rtol=0, atol=1e-5)
        # Groups of 3 real tokens: one router decision each (JetMoE's attention experts route every token).
        grouped += torch.equal(real[:3], real[:1].expand(3, -1))
    assert grouped == LAYERS


TINY_VISION = CLIPVisionConfig(
    **{key: value for key, value in ENCODER.items() if key != "vocab_size"}, image_size=32, patch_size=8
)


def features(output) -> torch.Tensor:
    return output.pooler_output if hasattr(output, "pooler_output") else output


def test_clips_text_and_vision_towers_each_group_their_own_tokens():
    # The text tower reads the call's padding mask, the vision tower (17 patches) none; `get_text_features` and
    # `get_image_features` call one tower directly, after whatever ran before.
    text = CLIPTextConfig(**ENCODER)
    config = CLIPConfig(text_config=text, vision_config=TINY_VISION, projection_dim=16)
    base = CLIPModel(config).eval()
    ids = torch.randint(3, 100, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = base(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    model = variator(base, ratio=4)
    towers = {name.split(".")[2] for name in wrapped(model)}
    assert towers == {"text_model", "vision_model"}
    with torch.no_grad():
        both = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        model(input_ids=ids[:, :6], attention_mask=torch.ones(2, 6, dtype=torch.long), pixel_values=pixels)
        texts = features(model.get_text_features(input_ids=ids, attention_mask=mask))
        images = features(model.get_image_features(pixel_values=pixels))
        second_text_alone = features(model.get_text_features(input_ids=ids[1:, :5]))
        first_image_alone = features(model.get_image_features(pixel_values=pixels[:1]))
        with model.disable_adapter():
            uncompressed = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    torch.testing.assert_close(uncompressed.logits_per_text, reference.logits_per_text)
    torch.testing.assert_close(texts[1], second_text_alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(images[0], first_image_alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(both.text_embeds, F.normalize(texts, dim=-1))
    assert not torch.allclose(both.logits_per_text, reference.logits_per_text)


def image_prompts(length: int, image: slice, image_token: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two prompts with an image's placeholder tokens at `image`, the first left-padded by 3 tokens, and two images."""
    ids = torch.randint(3, 90, (2, length))
    ids[:, image] = image_token
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    return ids, mask, torch.randn(2, 3, 32, 32)


def assert_the_padded_prompt_runs_as_alone(model, ids: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor) -> None:
    # The image's patches are not the prompt's tokens: the prompt's padding must not reach the vision tower.
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        alone = model(input_ids=ids[:1, 3:], pixel_values=pixels[:1]).logits
    torch.testing.assert_close(padded[0, 3:], alone[0], rtol=0, atol=1e-5)


def test_a_vision_language_model_compresses_its_vision_tower_and_its_prompt_and_generates():
    text = LlamaConfig(**DECODER)
    config = LlavaConfig(
        vision_config=TINY_VISION,
        text_config=text,
        image_token_index=99,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_seq_length=17,
    )
    base = LlavaForConditionalGeneration(config).eval()
    ids, mask, pixels = image_prompts(23, slice(4, 21), image_token=99)  # the image's 17 patch features
    settings = dict(max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        reference = base.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **settings)
    model = variator(base, ratio=4)
    assert {name.split(".")[3] for name in wrapped(model)} == {"vision_tower", "language_model"}
    assert_the_padded_prompt_runs_as_alone(model, ids, mask, pixels)
    with torch.no_grad():
        tokens = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **settings)
        with model.disable_adapter():
            uncompressed = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **settings)
    assert tokens.shape == reference.shape and torch.equal(uncompressed, reference)


@pytest.mark.parametrize(
    ("target_modules", "towers"), [(None, {"language_model"}), (["mlp"], {"language_model", "vision_tower"})]
)
def test_a_vision_tower_of_another_width_is_compressed_only_when_named(target_modules, towers):
    # LLaVA-1.5 pairs a 1024-wide CLIP with a 4096-wide Llama: found by structure, FFNs have the language model's
    # width; named as targets, the vision tower's get plugins of their own width.
    vision = CLIPVisionConfig(**{**TINY_VISION.to_dict(), "hidden_size": 48, "intermediate_size": 96})
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**DECODER),
        image_token_index=99,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_seq_length=17,
    )
    model = variator(LlavaForConditionalGeneration(config).eval(), ratio=4, target_modules=target_modules)
    assert {name.split(".")[3] for name in wrapped(model)} == towers
    assert_the_padded_prompt_runs_as_alone(model, *image_prompts(23, slice(4, 21), image_token=99))


def test_qwen2_vls_vision_tower_groups_each_images_and_each_video_frames_patches_on_their_own():
    # Its vision tower takes every image's patches flattened into one sequence, with each image's patch grid, and
    # its attention treats each frame of a video as a sequence of its own.
    text = Qwen2VLTextConfig(
        **{**DECODER, "vocab_size": 128},
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
    )
    vision = Qwen2VLVisionConfig(
        depth=LAYERS, embed_dim=H, hidden_size=H, num_heads=4, patch_size=2, spatial_merge_size=2, mlp_ratio=2
    )
    config = Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=120, vision_start_token_id=121, vision_end_token_id=122
    )
    model = variator(Qwen2VLForConditionalGeneration(config).eval(), ratio=8)
    assert any(".visual.blocks." in name for name in wrapped(model))
    # An image of 12 patches, then a video of two frames of 12: groups of 8 would straddle them.
    grids = torch.tensor([[1, 2, 6], [2, 2, 6]])
    pixels = torch.randn(36, 3 * 2 * 2 * 2)
    visual = model.base_model.model.model.visual
    with torch.no_grad():
        together = visual(pixels, grid_thw=grids).pooler_output
        frames = [visual(pixels[start : start + 12], grid_thw=grids[:1]).pooler_output for start in (0, 12, 24)]
    torch.testing.assert_close(together, torch.cat(frames), rtol=0, atol=1e-5)


def test_a_language_model_handed_its_own_masks_by_the_model_around_it_groups_by_the_calls_mask():
    # Gemma 3 hands its language model a dict of masks (one per attention type), PaliGemma a 4-D one: built from
    # the call's own 2-D mask, which stands.
    text = Gemma3TextConfig(**{**DECODER, "vocab_size": 128}, head_dim=8, sliding_window=8)
    config = Gemma3Config(
        text_config=text,
        vision_config=TINY_VISION,
        mm_tokens_per_image=4,
        image_token_index=120,
        boi_token_index=121,
        eoi_token_index=122,
    )
    model = variator(Gemma3ForConditionalGeneration(config).eval(), ratio=4)
    ids = torch.randint(3, 100, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[:1, 2:]).logits
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(padded[0, 2:], alone[0], rtol=0, atol=1e-5)
    assert tokens.shape == (2, 12)


def test_blip2s_query_transformer_groups_its_own_query_tokens_not_the_prompts():
    # The Q-former (its own model, called without a mask on 4 query tokens) runs inside the call on the prompt.
    vision = Blip2VisionConfig(**TINY_VISION.to_dict())
    qformer = Blip2QFormerConfig(**ENCODER, encoder_hidden_size=H)
    text = OPTConfig(vocab_size=128, hidden_size=H, ffn_dim=FFN_DIM, num_hidden_layers=LAYERS, num_attention_heads=4)
    config = Blip2Config(
        vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=4, image_token_index=120
    )
    base = Blip2ForConditionalGeneration(config).eval()
    model = variator(base, ratio=4)
    assert any(".qformer." in name for name in wrapped(model))
    ids, mask, pixels = image_prompts(12, slice(5, 9), image_token=120)  # the 4 query outputs
    assert_the_padded_prompt_runs_as_alone(model, ids, mask, pixels)
    with torch.no_grad():
        tokens = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3)
    assert tokens.shape[0] == 2


@pytest.mark.parametrize(("text_length", "padding"), [(9, 3), (8, 3), (8, 1), (7, 3)])
def test_blip2s_image_embeddings_do_not_depend_on_the_texts_padding(text_length, padding):
    # Image-text retrieval runs the Q-former on its 8 queries inside the call on the text, which may have as many
    # tokens: the queries are still grouped as they are.
    config = Blip2Config(
        vision_config=Blip2VisionConfig(**TINY_VISION.to_dict()),
        qformer_config=Blip2QFormerConfig(**ENCODER, encoder_hidden_size=H, use_qformer_text_input=True),
        text_config=OPTConfig(vocab_size=100, hidden_size=H, ffn_dim=FFN_DIM, num_hidden_layers=LAYERS),
        num_query_tokens=8,
        image_text_hidden_size=16,
    )
    config.image_token_index = None
    targets = r".*qformer\.encoder\.layer\.\d+\.(intermediate_query|output_query\.dense)"
    model = variator(Blip2ForImageTextRetrieval(config).eval(), ratio=4, target_modules=targets)
    pixels = torch.randn(1, 3, 32, 32)

    def image_embeddings(length: int, padding: int) -> torch.Tensor:
        mask = torch.ones(1, length, dtype=torch.long)
        mask[:, :padding] = 0
        with torch.no_grad():
            output = model(
                pixel_values=pixels,
                input_ids=torch.randint(3, 100, (1, length)),
                attention_mask=mask,
                use_image_text_matching_head=False,
            )
        return output.image_embeds

    torch.testing.assert_close(image_embeddings(text_length, padding), image_embeddings(9, 0), rtol=0, atol=1e-6)


def test_an_encoder_decoder_pair_compresses_its_encoder_found_by_its_own_config():
    # EncoderDecoderModel (BERT2BERT) keeps the hidden size in its encoder's config only.
    encoder = BertConfig(**ENCODER)
    decoder = BertConfig(**ENCODER, is_decoder=True, add_cross_attention=True)
    config = EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id = 2, 0
    base = EncoderDecoderModel(config=config).eval()
    ids = torch.randint(3, 100, (2, 9))
    mask = torch.ones_like(ids)
    ids[0, 6:], mask[0, 6:] = 0, 0
    with torch.no_grad():
        reference = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    model = variator(base, ratio=4)
    assert {name.split(".")[2] for name in wrapped(model)} == {"encoder"}
    with torch.no_grad():
        padded = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        alone = model.get_encoder()(input_ids=ids[:1, :6]).last_hidden_state
        with model.disable_adapter():
            uncompressed = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(padded[0, :6], alone[0], rtol=0, atol=1e-5)
    assert torch.equal(uncompressed, reference)


def test_experts_that_are_not_a_layers_whole_ffn_are_refused_as_a_target():
    """Mixtral's experts without their router (they also take the routing), JetMoE's experts inside attention (which
    calls their own methods, never their forward)."""
    base = mixture_of_experts("mixtral")
    with pytest.raises(ValueError, match="must be FFNs"):
        variator(base, target_modules=["experts"])
    with pytest.raises(ValueError, match="it is half an FFN"):  # its router reads the hidden states
        variator(mixture_of_experts("jetmoe"), target_modules=["self_attention.experts"])
    model = variator(base, target_modules=["mlp"])
    assert set(wrapped(model).values()) == {VariatorFFN}


@pytest.mark.parametrize("model_type", ["phi3", "camembert", "mixtral"])
def test_a_second_ratio_finds_the_same_ffns_by_structure_through_the_first_ones_plugins(model_type):
    """Found by structure, the FFNs are wrapped by the first adapter: the second must see through the wrappers."""
    if model_type == "mixtral":
        base = mixture_of_experts(model_type)
    else:
        config = AutoConfig.for_model(model_type, **{**ENCODER, **FOUND_BY_STRUCTURE[model_type][1]})
        base = (AutoModelForCausalLM if model_type == "phi3" else AutoModel).from_config(config).eval()
    model = variator(base, ratio=2)
    first = wrapped(model)
    model.add_adapter("ratio4", VariatorConfig(ratio=4))
    assert wrapped(model) == first
    assert all(
        set(layer.ratio) == {"default", "ratio4"} for layer in model.modules() if isinstance(layer, VariatorLayer)
    )
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        ratio2 = model(input_ids=ids)[0]
        model.set_adapter("ratio4")
        ratio4 = model(input_ids=ids)[0]
    assert ratio2.shape == ratio4.shape and not torch.allclose(ratio2, ratio4)


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        (["gate_up_proj", "down_proj"], None, "holds .*gate_up_proj.*another Variator adapter already wraps"),
        (None, ["gate_up_proj", "down_proj"], "'model.layers.0.mlp.gate_up_proj' is inside 'model.layers.0.mlp'"),
        (None, r"model\.layers\.\d+\.mlp\.(gate_up|down)_proj", "is inside 'model.layers.0.mlp'"),
    ],
)
def test_an_adapter_that_would_wrap_around_or_inside_another_ones_wrappers_is_refused(first, second, message):
    """Wrappers nested in wrappers could not be unloaded: all adapters must wrap the same modules (Phi-3's MLP, or
    its two halves)."""
    config = AutoConfig.for_model("phi3", **{**ENCODER, **FOUND_BY_STRUCTURE["phi3"][1]})
    model = variator(AutoModelForCausalLM.from_config(config).eval(), target_modules=first)
    before = wrapped(model)
    with pytest.raises(ValueError, match=message):
        model.add_adapter("ratio4", VariatorConfig(ratio=4, target_modules=second))
    assert wrapped(model) == before and list(model.peft_config) == ["default"]
    assert not any(isinstance(module, VariatorLayer) for module in model.unload().modules())


def sparse_seq2seq(model_type: str):
    """Every layer a mixture of experts kept as modules, one FFN each (Switch Transformers, NLLB-MoE)."""
    sizes = dict(d_model=H, d_ff=FFN_DIM, d_kv=8, num_layers=LAYERS, num_heads=4, encoder_ffn_dim=FFN_DIM)
    sizes |= dict(encoder_layers=LAYERS, encoder_attention_heads=4, decoder_ffn_dim=FFN_DIM, decoder_layers=LAYERS)
    sizes |= dict(decoder_attention_heads=4, num_decoder_layers=LAYERS, encoder_sparse_step=1, decoder_sparse_step=1)
    sizes |= dict(num_sparse_encoder_layers=LAYERS, num_sparse_decoder_layers=LAYERS, max_position_embeddings=64)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=100,
        num_experts=4,
        expert_capacity=64,
        pad_token_id=1,
        decoder_start_token_id=2,
        **sizes,
    )
    torch.manual_seed(0)
    return AutoModelForSeq2SeqLM.from_config(config).eval()


def test_experts_kept_as_modules_are_compressed_with_their_block_never_one_by_one(caplog):
    """An expert sees the tokens routed to it from every sequence: compressing it alone would mix sequences. Switch
    Transformers' block is wrapped whole; NLLB-MoE's, whose forward also takes a per-token padding mask, is left
    uncompressed with a warning."""
    model = variator(sparse_seq2seq("switch_transformers"))
    assert wrapped(model) == {f"base_model.model.encoder.block.{i}.layer.1.mlp": VariatorFFN for i in range(LAYERS)}
    ids = torch.randint(5, 100, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    start = torch.full((2, 1), 2)
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, decoder_input_ids=start).encoder_last_hidden_state
        alone = model(input_ids=ids[:1, :6], decoder_input_ids=start[:1]).encoder_last_hidden_state
    torch.testing.assert_close(padded[0, :6], alone[0], rtol=0, atol=1e-5)
    nllb = sparse_seq2seq("nllb-moe")
    with caplog.at_level(logging.WARNING, logger="peft_variator"):
        assert find_ffns(nllb, H, within=nllb.get_encoder()) == []
    assert "model.encoder.layers.0.ffn uncompressed" in caplog.text
    # Given as a target, an expert fails at the forward instead of compressing tokens of different sequences together.
    expert = variator(nllb, target_modules=["encoder.layers.0.ffn.experts.expert_0"])
    with pytest.raises(ValueError, match="sees a subset of the tokens"):
        expert(input_ids=ids, attention_mask=mask, decoder_input_ids=start)


def test_an_ffn_block_holding_its_own_norm_and_residual_is_refused_as_a_target():
    """Funnel's FFN module returns `layer_norm(x + ffn(x))`: compressing it would compress the residual stream."""
    config = FunnelConfig(vocab_size=100, block_sizes=[1, 1], d_model=H, n_head=2, d_head=16, d_inner=FFN_DIM)
    with pytest.raises(ValueError, match="normalises hidden states itself"):
        get_peft_model(FunnelBaseModel(config), VariatorConfig(ratio=2, target_modules=["ffn"]))


def test_found_by_structure_an_ffn_block_with_its_own_norm_gives_its_two_linears_as_a_split_ffn():
    """FNet's smallest FFN-shaped module is its whole layer (Fourier mixing, FFN, norms, residuals): its two linears
    are the FFN."""
    base = FNetModel(FNetConfig(vocab_size=100, hidden_size=H, num_hidden_layers=LAYERS, intermediate_size=FFN_DIM))
    ids = torch.randint(5, 100, (2, 9))
    with torch.no_grad():
        reference = base.eval()(input_ids=ids).last_hidden_state
    model = variator(base)
    halves = {"intermediate.dense": VariatorFFNInput, "output.dense": VariatorFFNOutput}
    assert wrapped(model) == {
        f"base_model.model.encoder.layer.{i}.{half}": kind for i in range(LAYERS) for half, kind in halves.items()
    }
    with torch.no_grad():
        compressed = model(input_ids=ids).last_hidden_state
        with model.disable_adapter():
            uncompressed = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(uncompressed, reference)
    assert compressed.shape == uncompressed.shape and not torch.allclose(compressed, uncompressed)


def test_multiple_choice_models_fold_their_choices_mask_into_the_batch():
    model = variator(BertForMultipleChoice(ENCODERS["bert"]).eval())
    ids = torch.randint(5, 100, (2, 3, 10))
    mask = torch.ones_like(ids)
    mask[0, 1, 6:] = 0
    other_padding = ids.clone()
    other_padding[0, 1, 6:] = 7
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(model(input_ids=other_padding, attention_mask=mask).logits, logits)


def test_a_3d_mask_that_is_not_a_multiple_choice_one_is_refused():
    model = variator(AutoModel.from_config(ENCODERS["bert"]).eval())
    ids = torch.randint(5, 100, (2, 8))
    with pytest.raises(ValueError, match="needs a 2-D padding mask"), torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones(2, 8, 8, dtype=torch.long))


def test_layers_that_see_a_shortened_sequence_are_refused_at_run_time():
    """Funnel pools the sequence between blocks: a layer there cannot tell which of its tokens are padding."""
    config = FunnelConfig(vocab_size=100, block_sizes=[1, 1], d_model=H, n_head=2, d_head=16, d_inner=FFN_DIM)
    model = variator(FunnelBaseModel(config).eval(), target_modules=["linear_1", "linear_2"])
    ids = torch.randint(5, 100, (2, 16))
    with pytest.raises(ValueError, match="shortens the sequence before this layer"), torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_models_that_run_their_layers_sequence_first_are_refused():
    config = XLNetConfig(vocab_size=100, d_model=H, n_layer=LAYERS, n_head=2, d_inner=FFN_DIM)
    with pytest.raises(ValueError, match="sequence-first"):
        get_peft_model(AutoModel.from_config(config), VariatorConfig(ratio=2, target_modules=["layer_1", "layer_2"]))


def test_a_layer_reached_with_another_batch_than_the_model_call_is_refused():
    model = variator(AutoModel.from_config(ENCODERS["bert"]).eval())
    with torch.no_grad():
        model(input_ids=torch.randint(5, 100, (2, 8)))
        layer = model.get_submodule("base_model.model.encoder.layer.0.intermediate")
        with pytest.raises(ValueError, match="model's last call had 2 sequences"):
            layer(torch.randn(3, 8, H))


def test_a_model_that_runs_its_ffn_in_sequence_chunks_is_refused_with_the_setting_to_change():
    config = BertConfig(vocab_size=100, hidden_size=H, intermediate_size=FFN_DIM, num_attention_heads=4)
    config.chunk_size_feed_forward = 4
    with pytest.raises(ValueError, match="chunk_size_feed_forward"):
        get_peft_model(AutoModel.from_config(config), VariatorConfig(ratio=2))


def test_ffns_split_over_two_linears_are_found_as_pairs():
    # OPT keeps fc1 (hidden -> I) and fc2 (I -> hidden) directly in each decoder layer, next to attention.
    config = OPTConfig(vocab_size=100, hidden_size=H, ffn_dim=FFN_DIM, num_hidden_layers=LAYERS, num_attention_heads=4)
    found = find_ffns(AutoModelForCausalLM.from_config(config), hidden_size=H)
    assert found == [f"model.decoder.layers.{i}.{name}" for i in range(LAYERS) for name in ("fc1", "fc2")]


def test_linears_around_the_layer_stack_are_not_taken_for_an_ffn():
    # OPT-350m projects its 512-wide embeddings to the hidden size and back (`project_in` / `project_out`).
    config = OPTConfig(
        vocab_size=100, hidden_size=H, word_embed_proj_dim=16, ffn_dim=FFN_DIM, num_hidden_layers=LAYERS,
        num_attention_heads=4,
    )  # fmt: skip
    found = find_ffns(AutoModelForCausalLM.from_config(config), hidden_size=H)
    assert found == [f"model.decoder.layers.{i}.{name}" for i in range(LAYERS) for name in ("fc1", "fc2")]


def test_ffns_inside_named_sub_layers_of_a_layer_stack_are_found_and_attention_is_not():
    """Grounding DINO's encoder layers hold sub-layers by name, each with fc1 / fc2 next to attention, and a fusion
    layer whose attention heads are wider than the hidden size (queries, keys and values hidden -> I)."""
    config = AutoConfig.for_model(
        "grounding-dino", vocab_size=100, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=FFN_DIM,
    )  # fmt: skip
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    found = [name for name in find_ffns(model, H) if name.startswith("encoder.layers.0.")]
    sub_layers = ("text_enhancer_layer", "deformable_layer")
    assert found == [f"encoder.layers.0.{sub_layer}.{fc}" for sub_layer in sub_layers for fc in ("fc1", "fc2")]


def test_token_mixing_blocks_shaped_like_an_ffn_are_not_taken_for_one():
    """Zamba's Mamba mixer maps hidden -> 2C -> hidden like a fused gated FFN, but its convolution and state mix
    tokens."""
    config = AutoConfig.for_model(
        "zamba", vocab_size=100, hidden_size=H, num_hidden_layers=4, layer_types=["mamba", "hybrid"] * 2,
        num_attention_heads=4, attention_hidden_size=2 * H, attention_head_dim=16, intermediate_size=FFN_DIM,
        mamba_expand=2, mamba_dt_rank=4, n_mamba_heads=2,
    )  # fmt: skip
    found = find_ffns(AutoModel.from_config(config), H)
    assert found and not any("mamba" in name for name in found)


def test_models_that_run_their_layers_sequence_first_include_fsmt():
    config = AutoConfig.for_model(
        "fsmt", src_vocab_size=100, tgt_vocab_size=100, d_model=H, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=FFN_DIM, decoder_ffn_dim=FFN_DIM,
        langs=["en", "de"],
    )  # fmt: skip
    with pytest.raises(ValueError, match="sequence-first"):
        get_peft_model(AutoModel.from_config(config), VariatorConfig(ratio=2))


def test_explicit_target_modules_win_over_the_table():
    model = variator(AutoModelForCausalLM.from_config(DECODERS["llama"]), target_modules=["layers.1.mlp"])
    assert list(wrapped(model)) == ["base_model.model.model.layers.1.mlp"]


def test_target_that_is_not_a_whole_ffn_is_refused():
    base = AutoModelForCausalLM.from_config(DECODERS["llama"])
    with pytest.raises(ValueError, match="not the first half of an FFN on its own"):
        variator(base, target_modules=["gate_proj"])
    with pytest.raises(ValueError, match="must be FFNs"):
        variator(base, target_modules=["q_proj"])
    # Refused before anything was replaced.
    assert not any(isinstance(module, VariatorLayer) for module in base.modules())


def test_model_without_any_ffn_asks_for_target_modules():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(x)

    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(Tiny(), VariatorConfig(ratio=2))
