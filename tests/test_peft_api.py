"""Variator through the ordinary PEFT API, as a PEFT user writes it."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import pytest
import torch
from conftest import randomize_plugins
from peft import (
    AutoPeftModelForSequenceClassification,
    PeftConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig, BertModel, LlamaConfig

from peft_variator import VariatorConfig
from peft_variator.layer import VariatorLayer


def tiny_bert_config() -> BertConfig:
    return BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, num_labels=3
    )


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )


def tiny_bert() -> BertModel:
    return BertModel(tiny_bert_config()).eval()


def inputs(batch: int = 2, seq_len: int = 11) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 100, (batch, seq_len))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def hidden(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


def test_get_peft_model_wraps_every_ffn_and_freezes_the_base():
    model = get_peft_model(tiny_bert(), VariatorConfig(ratio=4))
    wrapped = [name for name, module in model.named_modules() if isinstance(module, VariatorLayer)]
    # BERT's FFN is split: `intermediate` compresses, `output.dense` decompresses, in each of the 3 layers.
    assert len(wrapped) == 6
    assert all(name.endswith(("intermediate", "output.dense")) and "attention" not in name for name in wrapped)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("variator_" in name for name in trainable)


def test_print_trainable_parameters_counts_only_plugins(capsys):
    model = get_peft_model(tiny_bert(), VariatorConfig(ratio=4, adapter_dim=8))
    model.print_trainable_parameters()
    # Per layer: score (4*32 -> 4) + adapter (32 -> 8, 32 -> 8 no bias, 8 -> 32).
    per_layer = (4 * 32 * 4 + 4) + (32 * 8 + 8) + 32 * 8 + (8 * 32 + 32)
    assert f"trainable params: {3 * per_layer:,}" in capsys.readouterr().out


def test_untrained_plugin_starts_close_to_the_base_model():
    base = tiny_bert()
    batch = inputs()
    reference = hidden(base, batch)
    model = get_peft_model(base, VariatorConfig(ratio=2))
    compressed = hidden(model, batch)
    assert not torch.equal(compressed, reference)
    cosine = torch.nn.functional.cosine_similarity(compressed, reference, dim=-1)
    assert cosine[batch["attention_mask"].bool()].mean() > 0.8


def test_disable_adapter_gives_exactly_the_base_outputs():
    base = tiny_bert()
    batch = inputs()
    reference = hidden(base, batch)
    model = get_peft_model(base, VariatorConfig(ratio=4))
    randomize_plugins(model)
    with model.disable_adapter():
        assert torch.equal(hidden(model, batch), reference)
    assert not torch.allclose(hidden(model, batch), reference)


def test_save_pretrained_writes_only_plugin_weights_and_round_trips(tmp_path):
    model = get_peft_model(tiny_bert(), VariatorConfig(ratio=4, adapter_dim=8))
    randomize_plugins(model)
    batch = inputs()
    expected = hidden(model, batch)
    model.save_pretrained(tmp_path)

    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all("variator_" in key for key in saved)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "VARIATOR"

    loaded = PeftModel.from_pretrained(tiny_bert_with_same_weights(model), tmp_path)
    assert isinstance(PeftConfig.from_pretrained(tmp_path), VariatorConfig)
    torch.testing.assert_close(hidden(loaded, batch), expected)


def tiny_bert_with_same_weights(peft_model) -> BertModel:
    fresh = tiny_bert()
    with peft_model.disable_adapter():
        base_state = {k: v for k, v in peft_model.get_base_model().state_dict().items() if "variator_" not in k}
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in base_state.items()})
    return fresh


def test_state_dict_helpers_find_every_plugin_tensor():
    model = get_peft_model(tiny_bert(), VariatorConfig(ratio=4))
    randomize_plugins(model)
    state = get_peft_model_state_dict(model)
    assert len(state) == 3 * (2 + 5)  # per layer: score weight+bias, adapter 5 tensors
    other = get_peft_model(tiny_bert(), VariatorConfig(ratio=4))
    set_peft_model_state_dict(other, state)
    for key, value in get_peft_model_state_dict(other).items():
        torch.testing.assert_close(value, state[key])


def test_classification_head_is_saved_and_restored_with_the_adapter(tmp_path, minilm_path):
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=3)
    model = get_peft_model(base, VariatorConfig(ratio=4, task_type="SEQ_CLS"))
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    randomize_plugins(model)
    model.eval()
    batch = inputs()
    expected = model(**batch).logits.detach()
    model.save_pretrained(tmp_path)
    assert any(
        key.startswith("base_model.model.classifier") for key in load_file(tmp_path / "adapter_model.safetensors")
    )

    # The base checkpoint has a 2-label head; the number of labels is the user's to pass, as with any PEFT method.
    reloaded = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected)


def test_several_ratios_switch_at_run_time(tmp_path):
    model = get_peft_model(tiny_bert(), VariatorConfig(ratio=2), adapter_name="ratio2")
    model.add_adapter("ratio8", VariatorConfig(ratio=8))
    randomize_plugins(model)
    batch = inputs(seq_len=16)
    out2 = hidden(model, batch)
    model.set_adapter("ratio8")
    assert model.active_adapter == "ratio8"
    out8 = hidden(model, batch)
    assert not torch.allclose(out2, out8)
    model.set_adapter("ratio2")
    torch.testing.assert_close(hidden(model, batch), out2)

    model.save_pretrained(tmp_path)
    assert (tmp_path / "ratio8" / "adapter_model.safetensors").exists()
    fresh = PeftModel.from_pretrained(tiny_bert_with_same_weights(model), tmp_path / "ratio8", adapter_name="ratio8")
    torch.testing.assert_close(hidden(fresh, batch), out8)
    fresh.load_adapter(tmp_path / "ratio2", adapter_name="ratio2")
    fresh.set_adapter("ratio2")
    torch.testing.assert_close(hidden(fresh, batch), out2)


def test_set_adapter_copies_no_weights():
    model = get_peft_model(tiny_bert(), VariatorConfig(ratio=2), adapter_name="ratio2")
    model.add_adapter("ratio4", VariatorConfig(ratio=4))
    storage = {name: p.data_ptr() for name, p in model.named_parameters()}
    for name in ["ratio4", "ratio2", "ratio4"]:
        model.set_adapter(name)
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == storage


def test_two_active_adapters_are_refused():
    model = get_peft_model(tiny_bert(), VariatorConfig(ratio=2), adapter_name="ratio2")
    model.add_adapter("ratio4", VariatorConfig(ratio=4))
    with pytest.raises(ValueError, match="exactly one adapter"):
        model.base_model.set_adapter(["ratio2", "ratio4"])


def test_unknown_adapter_name_raises_and_leaves_the_model_as_it_was():
    model = get_peft_model(tiny_bert(), VariatorConfig(ratio=2), adapter_name="ratio2")
    model.add_adapter("ratio4", VariatorConfig(ratio=4))
    randomize_plugins(model)
    batch = inputs()
    before = hidden(model, batch)
    with pytest.raises(ValueError, match="ratio3"):
        model.set_adapter("ratio3")
    assert model.active_adapter == "ratio2"
    torch.testing.assert_close(hidden(model, batch), before)


def test_delete_adapter_removes_its_plugins():
    model = get_peft_model(tiny_bert(), VariatorConfig(ratio=2), adapter_name="ratio2")
    model.add_adapter("ratio4", VariatorConfig(ratio=4))
    model.delete_adapter("ratio4")
    assert list(model.peft_config) == ["ratio2"]
    assert not any("ratio4" in name for name, _ in model.named_parameters())


def test_unload_returns_the_untouched_base_model():
    base = tiny_bert()
    batch = inputs()
    reference, keys = hidden(base, batch), set(base.state_dict())
    model = get_peft_model(base, VariatorConfig(ratio=4))
    randomize_plugins(model)
    restored = model.unload()
    assert set(restored.state_dict()) == keys
    assert not any(isinstance(module, VariatorLayer) for module in restored.modules())
    assert not any("forward" in vars(module) or "_variator_padding" in vars(module) for module in restored.modules())
    assert not any(module._forward_pre_hooks for module in restored.modules())
    assert torch.equal(hidden(restored, batch), reference)


def test_unload_keeps_the_trained_classification_head_as_a_plain_module(tmp_path):
    base = AutoModelForSequenceClassification.from_config(tiny_bert_config())
    model = get_peft_model(base, VariatorConfig(ratio=4, task_type="SEQ_CLS"))
    trained_head = model.base_model.model.classifier.modules_to_save["default"]
    with torch.no_grad():
        trained_head.weight.normal_()
    restored = model.unload().eval()
    assert type(restored.classifier) is torch.nn.Linear
    assert torch.equal(restored.classifier.weight, trained_head.weight)
    batch = inputs()
    with torch.no_grad():
        expected = restored(**batch).logits
    restored.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected)


def test_merge_and_unload_explains_why_not_and_points_to_unload():
    model = get_peft_model(tiny_bert(), VariatorConfig(ratio=4))
    with pytest.raises(ValueError, match="unload()"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be folded"):
        model.merge_adapter()
    model.add_adapter("ratio8", VariatorConfig(ratio=8))
    with pytest.raises(ValueError, match="cannot be combined.*set_adapter"):
        model.add_weighted_adapter(["default", "ratio8"], [0.5, 0.5], "mixed")


def test_layers_to_transform_selects_layers_even_with_default_regex_targets():
    model = get_peft_model(tiny_bert(), VariatorConfig(ratio=4, layers_to_transform=[1]))
    wrapped = sorted(name for name, module in model.named_modules() if isinstance(module, VariatorLayer))
    assert wrapped == [
        "base_model.model.encoder.layer.1.intermediate",
        "base_model.model.encoder.layer.1.output.dense",
    ]


def test_push_to_hub_uploads_the_adapter_and_a_card_naming_method_ratio_and_base(monkeypatch, tmp_path, minilm_path):
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import EntryNotFoundError
    from transformers.utils import hub

    uploads = {}

    class OfflineApi:
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

        def create_commit(self, repo_id, operations, **kwargs):
            for operation in operations:
                with open(operation.path_or_fileobj, "rb") as handle:
                    uploads[operation.path_in_repo] = handle.read()
            return "committed"

    read_local_card = ModelCard.load

    def load_card(repo_id_or_path, **kwargs):
        if os.path.exists(repo_id_or_path):
            return read_local_card(repo_id_or_path, **kwargs)
        raise EntryNotFoundError("no card on the Hub yet")

    monkeypatch.setattr(hub, "hf_api", lambda: OfflineApi())
    monkeypatch.setattr(ModelCard, "load", staticmethod(load_card))

    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=3)
    model = get_peft_model(base, VariatorConfig(ratio=4, task_type="SEQ_CLS"))
    model.add_adapter("ratio8", VariatorConfig(ratio=8, task_type="SEQ_CLS"))
    assert model.push_to_hub("me/minilm-variator") == "committed"

    assert sorted(uploads) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "ratio8/adapter_config.json",
        "ratio8/adapter_model.safetensors",
    ]
    assert len(uploads["adapter_model.safetensors"]) < 2_000_000  # plugins + head, not the 90 MB model
    card = uploads["README.md"].decode()
    assert "library_name: peft" in card
    assert f"base_model: {minilm_path}" in card
    assert "- variator" in card and "- variator-ratio-4" in card and "- variator-ratio-8" in card
    assert "| `ratio8` | 8 |" in card and "| `default` | 4 |" in card


@pytest.mark.parametrize("selected_adapters", [None, ["ratio8"]])
def test_the_saved_card_lists_the_adapters_saved_and_its_code_loads_them(tmp_path, selected_adapters):
    import copy

    base = tiny_bert()
    pristine = copy.deepcopy(base)
    model = get_peft_model(base, VariatorConfig(ratio=4))
    model.add_adapter("ratio8", VariatorConfig(ratio=8))
    randomize_plugins(model)
    model.save_pretrained(tmp_path, selected_adapters=selected_adapters)
    saved = selected_adapters or ["default", "ratio8"]

    card = (tmp_path / "README.md").read_text()
    for name, ratio in (("default", 4), ("ratio8", 8)):
        assert (f"| `{name}` | {ratio} |" in card) == (name in saved)
        assert (f"- variator-ratio-{ratio}\n" in card) == (name in saved)
    code = card[card.index("```python") + len("```python") : card.rindex("```")]
    namespace = {"base_model": pristine, "repo_id": str(tmp_path)}
    exec(code, namespace)  # the card's own loading code, as a user copies it
    loaded = namespace["model"].eval()
    assert sorted(loaded.peft_config) == sorted(saved)
    model.set_adapter(loaded.active_adapter)
    batch = inputs()
    torch.testing.assert_close(hidden(loaded, batch), hidden(model.eval(), batch))


def plugin_grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(**batch).last_hidden_state.pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_recomputes_the_same_grouping():
    batch = inputs(batch=3, seq_len=13)
    batch["attention_mask"][1, :4] = 0  # left padding in one row, right padding in another
    config = tiny_bert_config()
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    model = get_peft_model(BertModel(config), VariatorConfig(ratio=4))
    randomize_plugins(model)
    model.train()  # checkpointing only runs in training mode
    expected = plugin_grads(model, batch)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = plugin_grads(model, batch)
    assert expected.keys() == checkpointed.keys() and len(expected) == 3 * 7
    for name, grad in expected.items():
        torch.testing.assert_close(checkpointed[name], grad)


def test_half_precision_models_keep_plugins_in_float32():
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_config(tiny_llama_config()).to(torch.bfloat16), VariatorConfig(ratio=4)
    )
    plugins = [p for n, p in model.named_parameters() if "variator_" in n]
    assert {p.dtype for p in plugins} == {torch.float32}
    logits = model(input_ids=torch.randint(0, 100, (2, 10))).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in plugins)


@pytest.mark.parametrize("architecture", ["llama", "bert"])
def test_without_autocast_every_plugin_follows_the_model_dtype(architecture):
    """`autocast_adapter_dtype=False` is how PEFT keeps adapters in a half-precision model's dtype (for inference).
    Every plugin tensor follows it: where the tuner layer wraps a whole FFN block (Llama's `mlp`), either half of a
    split one (BERT), and for an adapter added later. Finding the FFN's dtype is the same step as finding its device,
    which decides where an added adapter lands on a GPU."""
    from transformers import AutoModel

    config = tiny_llama_config() if architecture == "llama" else tiny_bert_config()
    base = AutoModel.from_config(config).to(torch.bfloat16)
    model = get_peft_model(base, VariatorConfig(ratio=4), autocast_adapter_dtype=False)
    model.add_adapter("ratio8", VariatorConfig(ratio=8), autocast_adapter_dtype=False)
    dtypes = {
        (name.split(".")[-3], name.split(".")[-2], p.dtype)
        for name, p in model.named_parameters()
        if "variator_" in name
    }
    assert {dtype for *_, dtype in dtypes} == {torch.bfloat16}
    assert {adapter for _, adapter, _ in dtypes} == {"default", "ratio8"}
    assert len({module for module, *_ in dtypes}) == 4  # the scoring map and the adapter's three linear maps
    model.set_adapter("ratio8")
    output = model(input_ids=torch.randint(0, 100, (2, 10))).last_hidden_state
    assert output.dtype == torch.bfloat16 and torch.isfinite(output).all()


def test_forwards_from_several_threads_keep_their_own_padding():
    from concurrent.futures import ThreadPoolExecutor

    model = get_peft_model(tiny_bert(), VariatorConfig(ratio=4))
    randomize_plugins(model)
    batches = [inputs(batch=b, seq_len=n) for b, n in [(2, 11), (3, 16), (1, 5), (4, 9)]]
    expected = [hidden(model, batch) for batch in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(5):
            results = list(pool.map(lambda batch: hidden(model, batch), batches))
            for result, reference in zip(results, expected, strict=True):
                torch.testing.assert_close(result, reference)


@pytest.mark.parametrize("architecture", ["bert", "llama"])
def test_torch_compile_runs_every_batch_and_adapter_as_eager_does(architecture):
    """Grouping a padded batch breaks dynamo's graph (the number of groups depends on the mask's values), so a
    compiled model must carry across graph breaks what eager mode keeps per thread: each call's own mask and, in
    BERT's split FFN, the layout the input half hands to the output half. The first compiled call comes before any
    eager one, so no layout is left over from eager mode."""
    from transformers import AutoModel

    config = tiny_llama_config() if architecture == "llama" else tiny_bert_config()
    model = get_peft_model(AutoModel.from_config(config).eval(), VariatorConfig(ratio=4))
    model.add_adapter("ratio2", VariatorConfig(ratio=2))
    randomize_plugins(model)
    unpadded, right_padded, left_padded = inputs(batch=3, seq_len=12), inputs(batch=3, seq_len=12), inputs(3, 9)
    unpadded["attention_mask"][:] = 1
    left_padded["attention_mask"][:] = 1
    left_padded["attention_mask"][1, :4] = 0
    torch._dynamo.reset()
    # backend="eager": dynamo's tracing and graph breaks, without inductor's minutes of code generation.
    compiled = torch.compile(model, backend="eager")
    with torch._dynamo.config.patch(recompile_limit=64), torch.no_grad():
        for adapter in ("default", "ratio2"):
            model.set_adapter(adapter)
            for batch in (unpadded, right_padded, left_padded):
                output = compiled(**batch).last_hidden_state
                torch.testing.assert_close(output, hidden(model, batch), rtol=0, atol=0)
        with model.disable_adapter():
            torch.testing.assert_close(compiled(**right_padded).last_hidden_state, hidden(model, right_padded))


def test_a_mask_buffer_refilled_in_place_between_calls_is_read_anew():
    model = get_peft_model(tiny_bert(), VariatorConfig(ratio=4))
    randomize_plugins(model)
    batch = inputs(batch=2, seq_len=12)
    batch["attention_mask"][:] = 1
    hidden(model, batch)
    batch["attention_mask"][1, 5:] = 0  # the same tensor, now padded
    fresh = {**batch, "attention_mask": batch["attention_mask"].clone()}
    torch.testing.assert_close(hidden(model, batch), hidden(model, fresh), rtol=0, atol=0)


def test_a_deep_copy_runs_like_the_original():
    import copy

    model = get_peft_model(tiny_bert(), VariatorConfig(ratio=4))
    randomize_plugins(model)
    batch = inputs(batch=3, seq_len=13)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(hidden(clone, batch), hidden(model, batch))
    with torch.no_grad():
        for name, parameter in clone.named_parameters():
            if "variator_up" in name:
                parameter.add_(0.5)
    assert not torch.allclose(hidden(clone, batch), hidden(model, batch))


def test_unloading_a_deep_copy_leaves_the_original_working_and_the_copy_bare():
    import copy

    model = get_peft_model(tiny_bert(), VariatorConfig(ratio=4))
    randomize_plugins(model)
    first, second = inputs(batch=3, seq_len=13), inputs(batch=2, seq_len=9)
    second["attention_mask"][1, :3] = 0
    expected = hidden(model, second)
    hidden(model, first)
    unloaded = copy.deepcopy(model).unload()
    # The original still records each batch's padding mask ...
    torch.testing.assert_close(hidden(model, second), expected)
    # ... and the unloaded copy keeps no Variator forward wrapper or attribute.
    for module in unloaded.modules():
        assert "forward" not in vars(module) and not module._forward_pre_hooks
        assert "_variator_padding" not in vars(module)


def test_a_batch_run_under_inference_mode_runs_again_with_autograd():
    # Evaluating a batch, then training on it: the grouping planned under inference mode is not reused.
    model = get_peft_model(tiny_bert(), VariatorConfig(ratio=4))
    randomize_plugins(model)
    batch = inputs()
    with torch.inference_mode():
        evaluated = model(**batch).last_hidden_state.clone()
    trained = model(**batch).last_hidden_state
    trained.sum().backward()
    torch.testing.assert_close(trained.detach(), evaluated)
    assert all(p.grad is not None for name, p in model.named_parameters() if "variator_compressor" in name)


def test_a_new_adapter_can_be_added_after_deleting_every_adapter():
    model = get_peft_model(tiny_bert(), VariatorConfig(ratio=4))
    model.delete_adapter("default")
    model.add_adapter("ratio2", VariatorConfig(ratio=2))
    model.set_adapter("ratio2")
    layers = [module for module in model.modules() if isinstance(module, VariatorLayer)]
    assert layers and all(layer.ratio == {"ratio2": 2} for layer in layers)
    assert hidden(model, inputs()).shape == (2, 11, 32)


def test_a_pickled_model_loads_with_the_same_outputs(tmp_path):
    model = get_peft_model(tiny_bert(), VariatorConfig(ratio=4))
    randomize_plugins(model)
    batch = inputs()
    expected = hidden(model, batch)
    torch.save(model, tmp_path / "model.pt")
    restored = torch.load(tmp_path / "model.pt", weights_only=False)
    torch.testing.assert_close(hidden(restored, batch), expected, rtol=0, atol=0)
    # Its padding is its own: a batch with other padding still groups by that batch's mask.
    other = inputs(batch=3, seq_len=9)
    torch.testing.assert_close(hidden(restored, other), hidden(model, other), rtol=0, atol=0)


def checkpointable(architecture: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if architecture == "bert":
        return BertModel(tiny_bert_config())
    return AutoModelForCausalLM.from_config(tiny_llama_config())


def last_hidden(model: PeftModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch, output_hidden_states=True).hidden_states[-1]


def enable_checkpointing(model: PeftModel, use_reentrant: bool) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.enable_input_require_grads()


def variator_gradients(model: PeftModel) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if "variator_" in name and p.grad is not None}


def assert_checkpointing_changes_no_gradient(
    plugin_gradients: Callable[[bool], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """`plugin_gradients(checkpointing)` gives the same plugin gradients with gradient checkpointing as without;
    returns them."""
    expected = plugin_gradients(False)
    checkpointed = plugin_gradients(True)
    assert expected and checkpointed.keys() == expected.keys()
    for name, gradient in expected.items():
        torch.testing.assert_close(checkpointed[name], gradient, msg=name)
    return expected


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("second_length", [11, 8])
@pytest.mark.parametrize("architecture", ["bert", "llama"])
def test_gradient_checkpointing_after_two_forwards_gives_the_gradients_of_running_without_it(
    architecture, second_length, use_reentrant, checkpointing_means
):
    """A contrastive loss runs the model on anchors, then on positives, then backpropagates both: the layers each
    recompute must group their own call's tokens, not the latest call's."""
    anchors = inputs()
    positives = inputs(seq_len=second_length)
    positives["attention_mask"][1, 3:] = 0  # other padding than the anchors'

    def plugin_gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = get_peft_model(checkpointable(architecture), VariatorConfig(ratio=4))
        randomize_plugins(model, std=0.2)
        model.train()
        if checkpointing:
            enable_checkpointing(model, use_reentrant)
        first, second = (last_hidden(model, batch) for batch in (anchors, positives))
        (first[:, 0] * second[:, 0]).sum().backward()
        return variator_gradients(model)

    expected = assert_checkpointing_changes_no_gradient(plugin_gradients)
    assert all(gradient.abs().sum() > 0 for gradient in expected.values())


def several_adapters(architecture: str, ratio4_layers: tuple[int, ...] | None = (1,)) -> PeftModel:
    """Ratio 2 on every layer, ratio 4 on `ratio4_layers` (None: every layer)."""
    model = get_peft_model(checkpointable(architecture), VariatorConfig(ratio=2), adapter_name="ratio2")
    model.add_adapter("ratio4", VariatorConfig(ratio=4, layers_to_transform=ratio4_layers and list(ratio4_layers)))
    randomize_plugins(model, std=0.2)
    return model.train()


def forwards_with_adapters(model: PeftModel, batch: dict[str, torch.Tensor], adapters: list[str | None]):
    """The summed losses of one forward per adapter (None: with adapters disabled), every plugin left trainable."""
    loss = 0
    for adapter in adapters:
        if adapter is None:
            with model.disable_adapter():
                loss = loss + last_hidden(model, batch).pow(2).mean()
        else:
            model.set_adapter(adapter)
            loss = loss + last_hidden(model, batch).pow(2).mean()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("variator_" in name)  # `set_adapter` froze the other adapter
    return loss


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("architecture", ["bert", "llama"])
def test_gradient_checkpointing_after_forwards_with_several_adapters_gives_the_gradients_of_running_without_it(
    architecture, use_reentrant
):
    """Plugins of several ratios trained on one batch, each through its own forward, then one backward of the summed
    losses (what VariatorTrainer's `ratios_adapters` does), with a forward of the base model among them: every
    recompute runs the adapter its forward ran (or none), also in the first layer, whose input is the same in every
    forward, and in layers that one of the adapters leaves uncompressed."""
    batch = inputs()
    batch["attention_mask"][1, :3] = 0

    def plugin_gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = several_adapters(architecture)
        if checkpointing:
            enable_checkpointing(model, use_reentrant)
        forwards_with_adapters(model, batch, ["ratio2", None, "ratio4"]).backward()
        return variator_gradients(model)

    expected = assert_checkpointing_changes_no_gradient(plugin_gradients)
    assert {name.split(".")[-2] for name in expected} == {"ratio2", "ratio4"}


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize(
    ("adapters", "message"),
    [
        # The first layer's input is the same in both forwards; ratio 4 leaves that layer uncompressed.
        (["ratio2", "ratio4"], "forward ran adapter 'ratio2' or no adapter, but it would now run no adapter"),
        # The second layer's input is the same in both forwards: ratio 4 compresses only that layer.
        ([None, "ratio4"], "forward ran adapter 'ratio4' or no adapter, but it would now run adapter 'ratio4'"),
    ],
)
@pytest.mark.usefixtures("checkpointing_by_other_means")
def test_a_recompute_that_cannot_switch_back_to_its_forwards_adapter_raises_instead_of_guessing(
    adapters, message, use_reentrant
):
    # A model that checkpoints by other means than transformers' function: layers recognise their call by input, but
    # cannot tell apart forwards of the same batch with two adapters (or none), nor run another adapter than the
    # active one.
    model = several_adapters("llama")
    enable_checkpointing(model, use_reentrant)
    loss = forwards_with_adapters(model, inputs(), adapters)
    with pytest.raises(RuntimeError, match=message):
        loss.backward()


@pytest.mark.usefixtures("checkpointing_by_other_means")
def test_checkpointing_by_other_means_runs_each_adapter_whose_backward_ran_before_the_next():
    # The forwards of an earlier step, already recomputed, do not make a later recompute ambiguous.
    batch = inputs()

    def plugin_gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = several_adapters("llama", ratio4_layers=None)
        if checkpointing:
            enable_checkpointing(model, use_reentrant=True)
        for adapter in ("ratio2", "ratio4", "ratio2"):
            forwards_with_adapters(model, batch, [adapter]).backward()
        return variator_gradients(model)

    assert_checkpointing_changes_no_gradient(plugin_gradients)


class SentenceEncoder(torch.nn.Module):
    """A user's own module around a transformers model: the last token's hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.model = checkpointable("llama").model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, -1]


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_inside_a_users_module_gives_the_gradients_of_running_without_it(use_reentrant):
    # The outermost call is the user's module, which knows nothing of checkpointing; the model inside it does.
    anchors, positives = inputs(), inputs(seq_len=8)
    positives["attention_mask"][0, :3] = 0

    def plugin_gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = get_peft_model(SentenceEncoder(), VariatorConfig(ratio=4, target_modules=["mlp"]))
        randomize_plugins(model, std=0.2)
        model.train()
        if checkpointing:
            model.base_model.model.model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
            model.base_model.model.model.enable_input_require_grads()
        (model(**anchors) * model(**positives)).sum().backward()
        return variator_gradients(model)

    assert_checkpointing_changes_no_gradient(plugin_gradients)


def checkpointed_llama() -> PeftModel:
    model = get_peft_model(AutoModelForCausalLM.from_config(tiny_llama_config()), VariatorConfig(ratio=4))
    randomize_plugins(model, std=0.2)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def test_gradient_checkpointing_after_scoring_the_same_batch_under_inference_mode(checkpointing_means):
    # An RL step scores its batch with the adapter on, then trains on it: the recompute must not take the scoring
    # call, whose layouts are inference tensors that autograd cannot save.
    model = checkpointed_llama()
    batch = inputs()
    with torch.inference_mode():
        model(**batch)
    model(**batch).logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if "variator_" in name)


def differently_padded_batches(count: int) -> list[dict[str, torch.Tensor]]:
    batches = [inputs() for _ in range(count)]
    for row, batch in enumerate(batches):
        batch["attention_mask"][1, : 1 + row % 5] = 0  # each its own padding
    return batches


def test_gradient_checkpointing_after_many_forwards_gives_the_gradients_of_running_without_it():
    batches = differently_padded_batches(17)

    def plugin_gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = checkpointed_llama()
        if not checkpointing:
            model.gradient_checkpointing_disable()
        sum(model(**batch).logits.logsumexp(-1).sum() for batch in batches).backward()
        return variator_gradients(model)

    assert_checkpointing_changes_no_gradient(plugin_gradients)


@pytest.mark.usefixtures("checkpointing_by_other_means")
def test_checkpointing_by_other_means_after_more_forwards_than_remembered_raises_instead_of_guessing():
    model = checkpointed_llama()
    loss = sum(model(**batch).logits.logsumexp(-1).sum() for batch in differently_padded_batches(17))
    with pytest.raises(RuntimeError, match="not among the last 16 calls"):
        loss.backward()


def test_unload_gives_back_the_models_own_checkpointing_function():
    model = checkpointed_llama()
    base = model.get_base_model()
    own = {
        name: module._gradient_checkpointing_func
        for name, module in base.named_modules()
        if "_gradient_checkpointing_func" in vars(module)
    }
    model(**inputs()).logits.sum().backward()
    wrapped = {
        name
        for name, module in base.named_modules()
        if type(vars(module).get("_gradient_checkpointing_func")).__name__ == "_ReplayingCheckpoint"
    }
    assert wrapped == set(own)
    unloaded = model.unload()
    assert {
        name: module._gradient_checkpointing_func
        for name, module in unloaded.named_modules()
        if "_gradient_checkpointing_func" in vars(module)
    } == own


def test_a_data_parallel_replica_is_refused_naming_distributed_data_parallel():
    # DataParallel copies every module shallowly, as `_replicate_for_data_parallel` does here (it needs no GPU).
    model = get_peft_model(tiny_bert(), VariatorConfig(ratio=4))
    replica = model.get_base_model()._replicate_for_data_parallel()
    with pytest.raises(RuntimeError, match=r"DataParallel.*DistributedDataParallel"):
        replica(**inputs())
    # The model itself runs as before.
    assert hidden(model, inputs()).shape == (2, 11, 32)


@pytest.mark.parametrize(
    ("target_modules", "message"),
    [
        (["up_proj", "down_proj"], r"'model.layers.0.mlp.up_proj' is not the first half of an FFN on its own"),
        (["gate_proj", "down_proj"], r"\['up_proj'\] next to it read the same hidden states"),
        (r"model\.layers\.\d+", r"'model.layers.0' \(LlamaDecoderLayer\) is more than one: it has hidden -> hidden"),
    ],
)
def test_targets_that_are_not_exactly_an_ffn_are_refused_naming_the_module(target_modules, message):
    from transformers import LlamaForCausalLM

    with pytest.raises(ValueError, match=message):
        get_peft_model(LlamaForCausalLM(tiny_llama_config()), VariatorConfig(target_modules=target_modules))


def test_a_whole_bert_layer_is_refused_for_its_attention_projections():
    with pytest.raises(ValueError, match="hidden -> hidden projections"):
        get_peft_model(tiny_bert(), VariatorConfig(target_modules=r"encoder\.layer\.\d+"))


def test_an_ffn_block_with_its_norm_and_residual_is_refused():
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    with pytest.raises(ValueError, match="is the FFN 'DenseReluDense' with what surrounds it"):
        get_peft_model(T5EncoderModel(config), VariatorConfig(target_modules=r"encoder\.block\.\d+\.layer\.1"))


def test_decoder_ffns_of_an_encoder_decoder_are_refused():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    with pytest.raises(ValueError, match="outside the encoder"):
        get_peft_model(T5ForConditionalGeneration(config), VariatorConfig(target_modules=["DenseReluDense"]))


def test_static_cache_generation_is_refused_with_the_cache_to_use():
    from transformers import LlamaForCausalLM

    model = get_peft_model(LlamaForCausalLM(tiny_llama_config()).eval(), VariatorConfig(ratio=2))
    batch = inputs()
    with pytest.raises(ValueError, match="default dynamic cache"):
        model.generate(**batch, max_new_tokens=2, cache_implementation="static")


def test_padding_is_still_recorded_after_accelerate_replaces_the_forward():
    # accelerate's hooks set `forward` on the instance, over Variator's wrapper; the mask must still be recorded.
    from accelerate import dispatch_model
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = get_peft_model(dispatch_model(tiny_bert(), device_map={"": "cpu"}, force_hooks=True), VariatorConfig())
    randomize_plugins(model)
    add_hook_to_module(model.get_base_model(), AlignDevicesHook(io_same_device=True))  # re-hooked
    padded = inputs()
    alone = {key: value[:1, :7] for key, value in padded.items()}
    hidden(model, inputs(batch=2, seq_len=11))  # a call with another mask first
    torch.testing.assert_close(hidden(model, padded)[0, :7], hidden(model, alone)[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("more_hooks", [False, True])
@pytest.mark.parametrize("architecture", ["bert", "llama"])
def test_layers_offloaded_by_a_device_map_run_their_plugins(architecture, more_hooks, tmp_path):
    """Offloaded to disk, each plugin Linear's weights stay on the meta device outside its own forward; BERT's split
    FFN and Llama's whole one decompress all the same, also where another hook was added next to the offloading one."""
    from accelerate import dispatch_model
    from accelerate.hooks import ModelHook, add_hook_to_module
    from transformers import LlamaModel

    base = tiny_bert() if architecture == "bert" else LlamaModel(tiny_llama_config()).eval()
    model = get_peft_model(base, VariatorConfig(ratio=2))
    randomize_plugins(model)
    batch = inputs()
    expected = hidden(model, batch)
    layers = "encoder.layer" if architecture == "bert" else "layers"
    device_map = {name: "cpu" for name, _ in base.named_children()}
    device_map.pop(layers.split(".")[0])
    device_map.update({f"{layers}.{i}": "disk" if i == 1 else "cpu" for i in range(len(base.get_submodule(layers)))})
    dispatch_model(base, device_map=device_map, offload_dir=str(tmp_path))
    assert any(parameter.device.type == "meta" for name, parameter in model.named_parameters() if "variator_" in name)
    if more_hooks:
        for module in base.modules():
            if getattr(getattr(module, "_hf_hook", None), "offload", False):
                # A SequentialHook of both, then one holding that SequentialHook and the third hook.
                add_hook_to_module(module, ModelHook(), append=True)
                add_hook_to_module(module, ModelHook(), append=True)
    torch.testing.assert_close(hidden(model, batch), expected)


def test_plugins_cannot_be_attached_to_layers_already_offloaded_and_the_model_is_left_as_it_was(tmp_path):
    # PEFT would create their weights on the meta device, where their values are lost: attach first, then offload.
    from accelerate import dispatch_model

    base = tiny_bert()
    device_map = {"embeddings": "cpu", "pooler": "cpu", "encoder.layer.0": "cpu", "encoder.layer.1": "disk"}
    device_map["encoder.layer.2"] = "cpu"
    dispatch_model(base, device_map=device_map, offload_dir=str(tmp_path / "offload"))
    with pytest.raises(ValueError, match=r"'encoder.layer.1.intermediate' is offloaded.*dispatch_model"):
        get_peft_model(base, VariatorConfig(ratio=4))
    assert not any(isinstance(module, VariatorLayer) for module in base.modules())
    # Once the plugins are in place, more adapters go next to them (their weights are not created on meta).
    model = get_peft_model(tiny_bert(), VariatorConfig(ratio=4))
    dispatch_model(model.get_base_model(), device_map=device_map, offload_dir=str(tmp_path / "attached"))
    model.add_adapter("ratio8", VariatorConfig(ratio=8))
    offloaded_layer = [p for name, p in model.named_parameters() if "ratio8" in name and "layer.1." in name]
    assert offloaded_layer and all(p.device.type == "cpu" for p in offloaded_layer)
    ratio4 = hidden(model, inputs())
    model.set_adapter("ratio8")
    assert not torch.allclose(hidden(model, inputs()), ratio4)


def test_the_forward_wrapper_rebound_as_a_method_still_runs():
    # accelerate's `unwrap_model(keep_fp32_wrapper=False)` rebinds `forward` with `MethodType(forward, model)`.
    import types

    base = tiny_bert()
    model = get_peft_model(base, VariatorConfig())
    batch = inputs()
    expected = hidden(model, batch)
    base.forward = types.MethodType(vars(base)["forward"], base)
    torch.testing.assert_close(hidden(model, batch), expected, rtol=0, atol=0)


def test_a_mixture_of_experts_block_is_one_ffn_target():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=100, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        first_k_dense_replace=0, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1, kv_lora_rank=8, q_lora_rank=8,
        qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
    )  # fmt: skip
    model = get_peft_model(DeepseekV3ForCausalLM(config), VariatorConfig(ratio=2, target_modules=["mlp"]))
    assert sum(isinstance(module, VariatorLayer) for module in model.modules()) == 2
    assert model(input_ids=torch.randint(1, 100, (2, 8))).logits.shape == (2, 8, 100)
