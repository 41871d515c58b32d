"""The two real offline models: all-MiniLM-L6-v2 (BERT) and SmolLM2-135M-Instruct (Llama, from GGUF)."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_plugins
from peft import get_peft_model
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from peft_variator import VariatorConfig
from peft_variator.layer import VariatorLayer

TEXTS = ["Self-driving cars are the future.", "I would never trust one!", "Meh, they are fine I guess, sometimes."]


def test_minilm_tokens_are_independent_of_padding_side_and_amount(minilm_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model = get_peft_model(AutoModel.from_pretrained(minilm_path), VariatorConfig(ratio=4)).eval()
    randomize_plugins(model, std=0.02)
    with torch.no_grad():
        alone = [model(**tokenizer([text], return_tensors="pt")).last_hidden_state[0] for text in TEXTS]
        for side in ("right", "left"):
            tokenizer.padding_side = side
            batch = tokenizer(TEXTS, padding="max_length", max_length=24, return_tensors="pt")
            # BERT's absolute positions must count real tokens for left padding to be meaningful at all.
            positions = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
            out = model(**batch, position_ids=positions).last_hidden_state
            for row, expected in enumerate(alone):
                real = batch["attention_mask"][row].bool()
                torch.testing.assert_close(out[row][real], expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def smollm(smollm_gguf):
    directory, gguf_file = smollm_gguf
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file).eval()
    return tokenizer, model


def test_smollm2_prefill_is_compressed_and_generate_matches_the_base_when_disabled(smollm):
    tokenizer, base = smollm
    prompts = tokenizer(["The capital of France is", "Once upon a time, in a land far away, there"], padding=True)
    prompts = {key: torch.tensor(value) for key, value in prompts.items()}
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    reference = base.generate(**prompts, **settings)

    model = get_peft_model(base, VariatorConfig(ratio=4, task_type="CAUSAL_LM"))
    try:
        assert sum(isinstance(m, VariatorLayer) for m in model.modules()) == base.config.num_hidden_layers
        generated = model.generate(**prompts, **settings)
        assert generated.shape == reference.shape
        with model.disable_adapter():
            assert torch.equal(model.generate(**prompts, **settings), reference)
    finally:
        model.unload()
