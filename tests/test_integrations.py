"""Variator through transformers' own PEFT integration and sentence-transformers, which accept a method registered
from outside PEFT."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_plugins
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer

from peft_variator import VariatorConfig
from peft_variator.layer import VariatorLayer

SENTENCES = ["Plugins make the model faster.", "A second, somewhat longer sentence to embed with padding."]


def encode(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).last_hidden_state


def test_transformers_add_adapter_set_adapter_and_disable(minilm_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model = AutoModel.from_pretrained(minilm_path).eval()
    reference = encode(model, tokenizer)

    model.add_adapter(VariatorConfig(ratio=2), adapter_name="ratio2")
    model.add_adapter(VariatorConfig(ratio=4), adapter_name="ratio4")
    randomize_plugins(model)
    model.set_adapter("ratio2")
    ratio2 = encode(model, tokenizer)
    model.set_adapter("ratio4")
    ratio4 = encode(model, tokenizer)
    assert not torch.allclose(ratio2, reference) and not torch.allclose(ratio2, ratio4)

    model.disable_adapters()
    torch.testing.assert_close(encode(model, tokenizer), reference, rtol=0, atol=0)
    model.enable_adapters()
    torch.testing.assert_close(encode(model, tokenizer), ratio4)

    model.save_pretrained(tmp_path, adapter_name="ratio4")  # transformers saves only the adapter
    fresh = AutoModel.from_pretrained(minilm_path).eval()
    fresh.load_adapter(str(tmp_path), adapter_name="ratio4")
    torch.testing.assert_close(encode(fresh, tokenizer), ratio4)


def test_sentence_transformers_add_adapter(minilm_path):
    model = SentenceTransformer(minilm_path, device="cpu")
    reference = model.encode(SENTENCES, convert_to_tensor=True)
    model.add_adapter(VariatorConfig(ratio=4), adapter_name="ratio4")
    wrapped = [module for module in model.modules() if isinstance(module, VariatorLayer)]
    assert len(wrapped) == 12  # 6 layers, each with the two halves of BERT's FFN
    compressed = model.encode(SENTENCES, convert_to_tensor=True)
    # An untrained plugin is average pooling: the embeddings move (training is what brings them back).
    assert compressed.shape == reference.shape and torch.isfinite(compressed).all()
    assert not torch.allclose(compressed, reference)
    model.disable_adapters()
    torch.testing.assert_close(model.encode(SENTENCES, convert_to_tensor=True), reference)


def test_sentence_transformers_encode_does_not_depend_on_the_batch_padding(minilm_path):
    # sentence-transformers calls the transformer's `forward` directly, past any forward hook: the mask must still
    # reach the plugins, or padding would be grouped with real tokens.
    model = SentenceTransformer(minilm_path, device="cpu")
    model.add_adapter(VariatorConfig(ratio=4), adapter_name="ratio4")
    randomize_plugins(model)
    short, long = "Plugins.", "A much longer sentence, which pads the short one in the same batch to its length."
    together = model.encode([short, long], convert_to_tensor=True)
    alone = model.encode([short], convert_to_tensor=True)
    torch.testing.assert_close(together[0], alone[0], rtol=0, atol=1e-5)


def test_transformers_set_adapter_refuses_two_variator_adapters_at_once(minilm_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model = AutoModel.from_pretrained(minilm_path).eval()
    model.add_adapter(VariatorConfig(ratio=2), adapter_name="ratio2")
    model.add_adapter(VariatorConfig(ratio=4), adapter_name="ratio4")
    model.set_adapter("ratio4")
    with pytest.raises(ValueError, match="exactly one adapter at a time"):
        model.set_adapter(["ratio2", "ratio4"])
    assert model.active_adapters() == ["ratio4"]
    assert torch.isfinite(encode(model, tokenizer)).all()
