"""The speed benchmark's reference point: the zero-cost ceiling runs each FFN on mean-pooled groups, exactly what an
untrained plugin (average pooling, zero correction) computes, only without the plugin's own work."""

import importlib.util
import os
import sys

import pytest
import torch
from peft import get_peft_model
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

from peft_variator import VariatorConfig

SPEED_PY = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "speed.py")


def speed_module():
    name = "variator_speed_benchmark"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SPEED_PY)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.mark.parametrize(
    "base",
    [
        lambda: BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)),
        lambda: LlamaModel(
            LlamaConfig(
                vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
            )
        ),
    ],
    ids=["split FFN (BERT)", "whole FFN (Llama)"],
)
def test_the_zero_cost_ceiling_computes_what_an_untrained_plugin_does(base):
    model = get_peft_model(base().eval(), VariatorConfig(ratio=4))
    ids = torch.randint(1, 100, (2, 13))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    with torch.no_grad():
        untrained = model(input_ids=ids, attention_mask=mask).last_hidden_state
        with speed_module().zero_cost_plugins(model):
            ceiling = model(input_ids=ids, attention_mask=mask).last_hidden_state
        with model.disable_adapter():
            uncompressed = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ceiling, untrained, rtol=0, atol=1e-5)
    assert not torch.allclose(ceiling, uncompressed)
