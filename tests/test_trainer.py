"""VariatorTrainer: the distillation loss, which weights it trains, multi-ratio runs, checkpoints and resuming, and
the Trainer features it must keep (gradient checkpointing, mixed precision), plus plain `transformers.Trainer`."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_plugins
from datasets import Dataset
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
    DataCollatorWithFlattening,
    DataCollatorWithPadding,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
    Trainer,
    TrainingArguments,
)

from peft_variator import VariatorConfig
from peft_variator.layer import VariatorLayer
from peft_variator.trainer import VariatorTrainer, last_packed_tokens, last_real_tokens, logits_kl, masked_mse

VOCAB, PAD = 100, 0


def tiny_bert(
    layers: int = 2, model_class: type = BertForSequenceClassification, num_labels: int = 3
) -> torch.nn.Module:
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return model_class(config)


TINY_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=PAD,
)


def tiny_llama() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(**TINY_DECODER))


def tiny_mixtral() -> MixtralForCausalLM:
    """A mixture of experts: 4 experts of 64, top 2."""
    return MixtralForCausalLM(MixtralConfig(**TINY_DECODER, num_local_experts=4, num_experts_per_tok=2))


def tiny_t5() -> T5ForConditionalGeneration:
    config = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        decoder_start_token_id=PAD,
        pad_token_id=PAD,
    )
    return T5ForConditionalGeneration(config)


def token_dataset(rows: int = 32, labels: str = "class", seed: int = 0) -> Dataset:
    """Random token sequences of 5 to 19 tokens; `labels` is "class" (an int), "lm" (the ids) or "none"."""
    generator = torch.Generator().manual_seed(seed)
    data = []
    for length in torch.randint(5, 20, (rows,), generator=generator).tolist():
        ids = torch.randint(1, VOCAB, (length,), generator=generator).tolist()
        row = {"input_ids": ids}
        if labels == "class":
            row["labels"] = sum(ids) % 3
        elif labels == "lm":
            row["labels"] = ids
        data.append(row)
    return Dataset.from_list(data)


def collate(rows: list[dict], pad_id: int = PAD) -> dict[str, torch.Tensor]:
    """Right-pads `input_ids` (and sequence `labels` with -100) and builds the attention mask."""
    longest = max(len(row["input_ids"]) for row in rows)
    batch = {
        "input_ids": torch.tensor([row["input_ids"] + [pad_id] * (longest - len(row["input_ids"])) for row in rows]),
        "attention_mask": torch.tensor(
            [[1] * len(row["input_ids"]) + [0] * (longest - len(row["input_ids"])) for row in rows]
        ),
    }
    if "labels" in rows[0]:
        if isinstance(rows[0]["labels"], list):
            batch["labels"] = torch.tensor([row["labels"] + [-100] * (longest - len(row["labels"])) for row in rows])
        else:
            batch["labels"] = torch.tensor([row["labels"] for row in rows])
    return batch


def training_args(output_dir, **overrides) -> TrainingArguments:
    settings = dict(
        per_device_train_batch_size=8,
        max_steps=8,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return TrainingArguments(str(output_dir), **settings)


def variator_bert(**config) -> PeftModel:
    config.setdefault("adapter_dim", 8)
    return get_peft_model(tiny_bert(), VariatorConfig(ratio=4, **config))


def variator_llama(**config) -> PeftModel:
    config.setdefault("adapter_dim", 8)
    return get_peft_model(tiny_llama(), VariatorConfig(ratio=4, **config))


def variator_t5() -> PeftModel:
    return get_peft_model(tiny_t5(), VariatorConfig(ratio=4, adapter_dim=8, task_type="SEQ_2_SEQ_LM"))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def changed(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])}


def distillation_loss(trainer: VariatorTrainer, batch: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, dict(batch)).item()


def task_loss_plus_mse(model, batch, task_weight: float, distill_weight: float, states: str) -> float:
    """The loss VariatorTrainer should report, computed by hand: the model's own loss plus the MSE of the last of
    `states` against the same model with its plugins disabled, over real tokens."""
    with torch.no_grad():
        with model.disable_adapter():
            teacher = model(**batch, output_hidden_states=True)
        student = model(**batch, output_hidden_states=True)
        mse = masked_mse(student[states][-1], teacher[states][-1], batch["attention_mask"])
        return (task_weight * student.loss + distill_weight * mse).item()


# The loss


def test_distillation_lowers_the_loss_and_changes_only_plugin_weights(tmp_path):
    model = variator_bert()
    # Far from the untrained start (average pooling), which is already close to a tiny random BERT.
    randomize_plugins(model, std=0.2)
    data = token_dataset(64, labels="none")
    trainer = VariatorTrainer(
        model=model, args=training_args(tmp_path, max_steps=16), train_dataset=data, data_collator=collate
    )
    batch = collate([data[i] for i in range(16)])
    before_loss, before = distillation_loss(trainer, batch), snapshot(model)

    trainer.train()

    assert distillation_loss(trainer, batch) < 0.2 * before_loss
    moved = changed(model, before)
    plugin_names = {name for name, _ in model.named_parameters() if "variator_" in name}
    assert moved == plugin_names


def test_loss_is_task_loss_plus_weighted_hidden_state_mse_of_the_last_layer(tmp_path):
    model = variator_bert()
    randomize_plugins(model)
    trainer = VariatorTrainer(
        model=model, args=training_args(tmp_path), distill_weight=3.0, task_weight=0.5, data_collator=collate
    )
    batch = collate([token_dataset(4)[i] for i in range(4)])
    expected = task_loss_plus_mse(model, batch, task_weight=0.5, distill_weight=3.0, states="hidden_states")
    assert distillation_loss(trainer, batch) == pytest.approx(expected, rel=1e-5)


def test_padded_tokens_do_not_enter_the_distillation_loss(tmp_path):
    model = variator_bert()
    randomize_plugins(model)
    trainer = VariatorTrainer(model=model, args=training_args(tmp_path), task_weight=0.0, data_collator=collate)
    rows = [token_dataset(4, labels="none")[i] for i in range(4)]
    assert len({len(row["input_ids"]) for row in rows}) > 1
    # Different pad ids give padded positions different hidden states, but must give the same loss.
    assert distillation_loss(trainer, collate(rows, pad_id=0)) == pytest.approx(
        distillation_loss(trainer, collate(rows, pad_id=7)), rel=1e-6
    )


def test_masked_mse_averages_over_real_tokens_only():
    student, teacher = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)
    student[0, 0] = 2.0  # real: squared error 4
    student[1, 2] = 100.0  # padding
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert masked_mse(student, teacher, mask).item() == pytest.approx(4.0 / 4)
    assert masked_mse(student, teacher, None).item() == pytest.approx((4.0 + 10000.0) / 6)


def test_distill_layers_all_matches_the_output_of_each_compressed_layer(tmp_path):
    model = get_peft_model(tiny_bert(layers=3), VariatorConfig(ratio=2, adapter_dim=8, layers_to_transform=[0, 2]))
    randomize_plugins(model)
    trainer = VariatorTrainer(
        model=model, args=training_args(tmp_path), task_weight=0.0, distill_layers="all", data_collator=collate
    )
    batch = collate([token_dataset(4)[i] for i in range(4)])
    with torch.no_grad():
        with model.disable_adapter():
            teacher = model(**batch, output_hidden_states=True).hidden_states
        student = model(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"]
    # hidden_states[i + 1] is layer i's output: layers 0 and 2 are compressed, layer 1 is not.
    expected = (masked_mse(student[1], teacher[1], mask) + masked_mse(student[3], teacher[3], mask)) / 2
    assert distillation_loss(trainer, batch) == pytest.approx(expected.item(), rel=1e-5)


def test_logits_kl_is_zero_for_equal_logits_and_scaled_by_temperature_squared():
    teacher = torch.randn(4, 3)
    assert logits_kl(teacher, teacher, None).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(4, 3)
    expected = torch.nn.functional.kl_div(
        (student / 2).log_softmax(-1), (teacher / 2).log_softmax(-1), log_target=True, reduction="batchmean"
    )
    assert logits_kl(student, teacher, None, temperature=2.0).item() == pytest.approx(4 * expected.item(), rel=1e-5)


def test_logits_weight_adds_the_kl_between_student_and_teacher_logits(tmp_path):
    model = variator_bert()
    randomize_plugins(model, std=0.3)
    trainer = VariatorTrainer(
        model=model,
        args=training_args(tmp_path),
        distill_weight=0.0,
        task_weight=0.0,
        logits_weight=1.0,
        logits_temperature=2.0,
        data_collator=collate,
    )
    batch = collate([token_dataset(4)[i] for i in range(4)])
    with torch.no_grad():
        with model.disable_adapter():
            teacher = model(**batch).logits
        student = model(**batch).logits
    loss = distillation_loss(trainer, batch)
    assert loss > 0
    assert loss == pytest.approx(logits_kl(student, teacher, None, 2.0).item(), rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"distill_layers": "first"}, "distill_layers"),
        ({"distill_weight": -1.0}, "distill_weight"),
        ({"distill_weight": 0.0, "task_weight": 0.0}, "nothing to train"),
        ({"logits_temperature": 0.0}, "logits_temperature"),
        ({"ratios_adapters": ["default", "missing"]}, "missing"),
        ({"ratios_adapters": "default"}, "ratios_adapters"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(tmp_path, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        VariatorTrainer(model=variator_bert(), args=training_args(tmp_path), **kwargs)


def test_a_model_without_variator_plugins_is_refused(tmp_path):
    with pytest.raises(ValueError, match="get_peft_model"):
        VariatorTrainer(model=tiny_bert(), args=training_args(tmp_path))


@pytest.mark.parametrize("label_smoothing_factor", [0.0, 0.1])
def test_task_loss_is_the_models_loss_for_the_trainers_label_names(tmp_path, label_smoothing_factor):
    # Question answering has no `labels`: its loss comes from `start_positions` and `end_positions`, and, as in the
    # Trainer, from the model itself even with a label smoother (which reads `labels` only).
    model = get_peft_model(
        tiny_bert(model_class=BertForQuestionAnswering, num_labels=2),
        VariatorConfig(ratio=4, adapter_dim=8, modules_to_save=["qa_outputs"]),
    )
    randomize_plugins(model, std=0.2)
    trainer = VariatorTrainer(
        model=model,
        args=training_args(tmp_path, label_smoothing_factor=label_smoothing_factor),
        task_weight=1.0,
        distill_weight=0.0,
        data_collator=collate,
    )
    assert trainer.label_names == ["start_positions", "end_positions"]
    batch = collate([token_dataset(4, "none")[i] for i in range(4)])
    batch["start_positions"] = torch.tensor([0, 1, 2, 3])
    batch["end_positions"] = torch.tensor([2, 3, 4, 4])
    with torch.no_grad():
        expected = model(**batch).loss
    assert expected > 0
    assert distillation_loss(trainer, batch) == pytest.approx(expected.item(), rel=1e-5)


def test_task_loss_uses_labels_when_the_forward_names_no_label_arguments(tmp_path):
    # A forward taking `**kwargs` (remote code) gives the Trainer no `label_names`; it still trains on `labels`.
    class KeywordsOnly(BertForSequenceClassification):
        def forward(self, **kwargs):
            return super().forward(**kwargs)

    model = get_peft_model(
        tiny_bert(model_class=KeywordsOnly), VariatorConfig(ratio=4, adapter_dim=8, modules_to_save=["classifier"])
    )
    trainer = VariatorTrainer(model=model, args=training_args(tmp_path), distill_weight=0.0, data_collator=collate)
    assert trainer.label_names == []
    batch = collate([token_dataset(4)[i] for i in range(4)])
    with torch.no_grad():
        expected = model(**batch).loss
    assert distillation_loss(trainer, batch) == pytest.approx(expected.item(), rel=1e-5)


def test_label_smoothing_factor_smooths_the_task_loss(tmp_path):
    model = variator_bert()
    randomize_plugins(model)
    # A more confident head than the initial one, so that smoothing moves the loss well past the tolerance.
    torch.nn.init.normal_(model.get_base_model().classifier.weight, std=1.0)
    trainer = VariatorTrainer(
        model=model,
        args=training_args(tmp_path, label_smoothing_factor=0.5),
        distill_weight=0.0,
        data_collator=collate,
    )
    batch = collate([token_dataset(8)[i] for i in range(8)])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    smoothed = F.cross_entropy(logits, batch["labels"], label_smoothing=0.5).item()
    assert abs(smoothed - F.cross_entropy(logits, batch["labels"]).item()) > 1e-3
    assert distillation_loss(trainer, batch) == pytest.approx(smoothed, rel=1e-5)


def test_compute_loss_func_gives_the_task_loss_and_distillation_is_added(tmp_path):
    model = variator_bert()
    randomize_plugins(model)
    received_labels = []

    def constant_loss(outputs, labels, num_items_in_batch=None):
        received_labels.append(labels)
        return torch.tensor(100.0)

    trainer = VariatorTrainer(
        model=model,
        args=training_args(tmp_path),
        task_weight=0.5,
        distill_weight=3.0,
        compute_loss_func=constant_loss,
        data_collator=collate,
    )
    batch = collate([token_dataset(4)[i] for i in range(4)])
    with torch.no_grad():
        with model.disable_adapter():
            teacher = model(**batch, output_hidden_states=True).hidden_states[-1]
        student = model(**batch, output_hidden_states=True).hidden_states[-1]
    expected = 0.5 * 100.0 + 3.0 * masked_mse(student, teacher, batch["attention_mask"]).item()
    assert distillation_loss(trainer, batch) == pytest.approx(expected, rel=1e-5)
    assert len(received_labels) == 1
    assert torch.equal(received_labels[0], batch["labels"])


def test_a_model_configured_with_return_dict_false_gets_the_same_loss(tmp_path):
    model = variator_bert()
    randomize_plugins(model)
    trainer = VariatorTrainer(model=model, args=training_args(tmp_path), logits_weight=1.0, data_collator=collate)
    batch = collate([token_dataset(4)[i] for i in range(4)])
    expected = distillation_loss(trainer, batch)
    model.get_base_model().config.return_dict = False
    assert distillation_loss(trainer, batch) == pytest.approx(expected, rel=1e-6)


def test_logits_weight_on_a_model_without_logits_raises_naming_logits_weight(tmp_path):
    model = get_peft_model(tiny_bert(model_class=BertModel), VariatorConfig(ratio=4, adapter_dim=8))
    trainer = VariatorTrainer(
        model=model, args=training_args(tmp_path), task_weight=0.0, logits_weight=1.0, data_collator=collate
    )
    batch = collate([token_dataset(4, "none")[i] for i in range(4)])
    with pytest.raises(ValueError, match="`logits_weight` > 0 needs a model that returns `logits`"):
        distillation_loss(trainer, batch)


def test_a_batch_without_labels_raises_when_only_the_task_loss_is_weighted(tmp_path):
    trainer = VariatorTrainer(
        model=variator_bert(),
        args=training_args(tmp_path, max_steps=1),
        task_weight=1.0,
        distill_weight=0.0,
        train_dataset=token_dataset(8, "none"),
        data_collator=collate,
    )
    with pytest.raises(ValueError, match="no labels.*`task_weight` is the only nonzero loss weight"):
        trainer.train()


# Encoder-decoders


def test_encoder_decoder_loss_from_input_ids_and_labels_is_task_loss_plus_encoder_hidden_state_mse(tmp_path):
    # The teacher runs without labels, so the trainer must build the decoder inputs from them as the model does.
    model = variator_t5()
    randomize_plugins(model)
    trainer = VariatorTrainer(
        model=model, args=training_args(tmp_path), distill_weight=3.0, task_weight=0.5, data_collator=collate
    )
    batch = collate([token_dataset(4, "lm")[i] for i in range(4)])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    expected = task_loss_plus_mse(model, batch, task_weight=0.5, distill_weight=3.0, states="encoder_hidden_states")
    assert distillation_loss(trainer, batch) == pytest.approx(expected, rel=1e-5)


def test_encoder_decoder_plugins_train_by_distillation_on_input_ids_and_labels(tmp_path):
    model = variator_t5()
    before = snapshot(model)
    trainer = VariatorTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=2),
        task_weight=0.0,
        train_dataset=token_dataset(16, "lm"),
        data_collator=collate,
    )
    assert trainer.train().training_loss > 0
    assert changed(model, before) == {name for name, _ in model.named_parameters() if "variator_" in name}


@pytest.mark.parametrize("decoder_positions", ["decoder_attention_mask", "labels"])
def test_encoder_decoder_logits_kl_counts_the_real_decoder_positions(tmp_path, decoder_positions):
    model = variator_t5()
    randomize_plugins(model, std=0.3)
    trainer = VariatorTrainer(
        model=model,
        args=training_args(tmp_path),
        task_weight=0.0,
        distill_weight=0.0,
        logits_weight=1.0,
        data_collator=collate,
    )
    # 12 source tokens, the second row's last 4 padding; 6 target tokens, the second row's last 3 padding. The
    # source mask's last 6 columns would count 2 target tokens of the second row instead of 3.
    targets = torch.randint(1, VOCAB, (2, 6))
    target_mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    batch = {
        "input_ids": torch.randint(1, VOCAB, (2, 12)),
        "attention_mask": torch.tensor([[1] * 12, [1] * 8 + [0] * 4]),
    }
    if decoder_positions == "labels":
        batch["labels"] = targets.masked_fill(target_mask == 0, -100)
    else:
        batch.update(decoder_input_ids=targets, decoder_attention_mask=target_mask)
    with torch.no_grad():
        with model.disable_adapter():
            teacher = model(**batch).logits
        student = model(**batch).logits
    expected = logits_kl(student, teacher, target_mask).item()
    assert expected > 0
    assert distillation_loss(trainer, batch) == pytest.approx(expected, rel=1e-5)


# Causal language models


def test_causal_lm_task_loss_through_compressed_prompts_is_refused(tmp_path):
    model = variator_llama()
    trainer = VariatorTrainer(
        model=model, args=training_args(tmp_path), train_dataset=token_dataset(16, "lm"), data_collator=collate
    )
    with pytest.raises(ValueError, match="task_weight"):
        trainer.train()


@pytest.mark.parametrize("build", [tiny_llama, tiny_mixtral])
def test_causal_lm_plugins_train_by_distillation_alone(tmp_path, build):
    model = get_peft_model(build(), VariatorConfig(ratio=4, adapter_dim=8))
    randomize_plugins(model, std=0.2)
    data = token_dataset(64, "lm")
    trainer = VariatorTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=16),
        task_weight=0.0,
        train_dataset=data,
        data_collator=collate,
    )
    batch = collate([data[i] for i in range(16)])
    before_loss, before = distillation_loss(trainer, batch), snapshot(model)
    trainer.train()
    assert distillation_loss(trainer, batch) < 0.7 * before_loss
    assert changed(model, before) == {name for name, _ in model.named_parameters() if "variator_" in name}


def test_last_real_tokens_marks_the_end_of_each_sequence_whatever_the_padding_side():
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [0, 1, 0, 0, 0, 0]])
    assert last_real_tokens(mask, 2).int().tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1], [0, 1, 0, 0, 0, 0]]


def test_decode_tokens_defaults_to_8_for_causal_lms_that_keep_the_last_token_exact(tmp_path):
    def resolved(model, **kwargs):
        return VariatorTrainer(model=model, args=training_args(tmp_path), task_weight=0.0, **kwargs).decode_tokens

    assert resolved(variator_llama()) == 8
    assert resolved(variator_llama(exact_last_token=False)) == 0
    assert resolved(variator_bert()) == 0
    assert resolved(variator_llama(), decode_tokens=0) == 0


@pytest.mark.parametrize(
    ("make_model", "decode_tokens", "message"),
    [
        (variator_llama, -1, "integer >= 0"),
        (variator_llama, 2.0, "integer >= 0"),
        (variator_bert, 4, "causal language models"),
        (lambda: variator_llama(exact_last_token=False), 4, "exact_last_token"),
    ],
)
def test_bad_decode_tokens_raise_naming_the_argument(tmp_path, make_model, decode_tokens, message):
    with pytest.raises(ValueError, match=f"decode_tokens.*{message}"):
        VariatorTrainer(model=make_model(), args=training_args(tmp_path), task_weight=0.0, decode_tokens=decode_tokens)


TWO_PROMPTS = [{"input_ids": list(range(1, 14))}, {"input_ids": list(range(20, 29))}]  # 13 and 9 tokens


def one_training_step(tmp_path, model, data_collator=collate, prompts=TWO_PROMPTS, **trainer_kwargs) -> float:
    """The loss of one step on `prompts` (learning rate 0: the weights stay as they are)."""
    trainer = VariatorTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=1, per_device_train_batch_size=len(prompts), learning_rate=0.0),
        task_weight=0.0,
        train_dataset=Dataset.from_list(prompts),
        data_collator=data_collator,
        **trainer_kwargs,
    )
    return trainer.train().training_loss


def test_while_training_the_last_decode_tokens_of_each_sequence_run_exact(tmp_path):
    model = variator_llama()
    randomize_plugins(model, std=0.2)
    first_layer_outputs = []  # the teacher's, then the student's
    hook = (
        model.get_base_model()
        .model.layers[0]
        .register_forward_hook(
            lambda _module, _args, output: first_layer_outputs.append(
                output[0] if isinstance(output, tuple) else output
            )
        )
    )
    try:
        one_training_step(tmp_path, model, decode_tokens=3)
        teacher, student = first_layer_outputs
        # The first layer's attention reads uncompressed embeddings, so there an exact FFN gives the teacher's output.
        lengths = [len(row["input_ids"]) for row in TWO_PROMPTS]
        rows = {length: row for row, length in enumerate(collate(TWO_PROMPTS)["attention_mask"].sum(1).tolist())}
        for length in lengths:
            row = rows[length]
            torch.testing.assert_close(student[row, length - 3 : length], teacher[row, length - 3 : length])
            assert not torch.allclose(student[row, : length - 3], teacher[row, : length - 3])
        # Outside training the adapter's own layout holds again: of the last three, only the last token is exact.
        with torch.no_grad():
            model(**collate(TWO_PROMPTS))
        served = first_layer_outputs[-1]
        assert not torch.allclose(served[0, 10:12], teacher[rows[13], 10:12])
        torch.testing.assert_close(served[0, 12], teacher[rows[13], 12])
    finally:
        hook.remove()


def test_with_decode_tokens_the_logits_kl_counts_those_positions_only(tmp_path):
    model = variator_llama()
    randomize_plugins(model, std=0.2)

    def loss(decode_tokens: int) -> float:
        kwargs = dict(distill_weight=0.0, logits_weight=1.0, decode_tokens=decode_tokens)
        return one_training_step(tmp_path, model, **kwargs)

    batch = collate(TWO_PROMPTS)
    with torch.no_grad():
        with model.disable_adapter():
            teacher = model(**batch).logits
        student = model(**batch).logits
    # Without decode tokens: the KL over every real token. Covering whole sequences: nothing is compressed.
    assert loss(0) == pytest.approx(logits_kl(student, teacher, batch["attention_mask"]).item(), rel=1e-4)
    assert loss(13) == pytest.approx(0.0, abs=1e-6)
    assert 0 < loss(3) < loss(0)


def test_last_packed_tokens_marks_the_end_of_each_sequence_in_a_row():
    sequence_index = torch.tensor([[0, 0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0, 0]])
    assert last_packed_tokens(sequence_index, 2).int().tolist() == [[0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1]]


@pytest.mark.parametrize("prompts", [TWO_PROMPTS, TWO_PROMPTS[:1]], ids=["two sequences", "one sequence"])
def test_a_padding_free_batch_trains_on_the_same_loss_as_the_padded_one(tmp_path, prompts):
    # Hidden-state MSE over every token and the logits KL over each sequence's last decode tokens, packed or padded
    # (a batch of one sequence is not packed at all, and has no mask either).
    model = variator_llama()
    model.get_base_model().config.use_cache = False  # transformers keeps packed sequences apart only without a cache
    randomize_plugins(model, std=0.2)
    kwargs = dict(distill_weight=1.0, logits_weight=1.0, decode_tokens=3)
    padded = one_training_step(tmp_path, model, prompts=prompts, **kwargs)
    packed = one_training_step(tmp_path, model, DataCollatorWithFlattening(), prompts, **kwargs)
    assert packed == pytest.approx(padded, rel=1e-4)


def test_gradient_checkpointing_recomputes_the_decode_token_layout(tmp_path):
    def run(output_dir, **overrides):
        torch.manual_seed(0)
        model = variator_llama()
        trainer = VariatorTrainer(
            model=model,
            args=training_args(output_dir, max_steps=3, **overrides),
            task_weight=0.0,
            logits_weight=1.0,
            decode_tokens=3,
            train_dataset=token_dataset(24, "none"),
            data_collator=collate,
        )
        trainer.train()
        return model

    plain = run(tmp_path / "plain")
    checkpointed = run(tmp_path / "checkpointed", gradient_checkpointing=True)
    plain_state = plain.state_dict()
    for name, value in checkpointed.state_dict().items():
        torch.testing.assert_close(value, plain_state[name])


# Several adapters


def two_ratio_bert() -> PeftModel:
    model = get_peft_model(
        tiny_bert(), VariatorConfig(ratio=4, adapter_dim=8, modules_to_save=["classifier"]), adapter_name="ratio4"
    )
    model.add_adapter("ratio2", VariatorConfig(ratio=2, adapter_dim=8, modules_to_save=["classifier"]))
    return model


def test_several_ratios_share_one_teacher_forward_per_batch(tmp_path):
    model = two_ratio_bert()
    calls: list[str | None] = []
    first_layer = next(module for module in model.modules() if isinstance(module, VariatorLayer))
    model.get_base_model().bert.register_forward_pre_hook(lambda *_: calls.append(first_layer.active_plugin()))
    trainer = VariatorTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=3),
        train_dataset=token_dataset(24),
        data_collator=collate,
        ratios_adapters=["ratio4", "ratio2"],
    )
    trainer.train()
    assert calls == [None, "ratio4", "ratio2"] * 3


def test_several_ratios_are_trained_together_and_saved_as_separate_adapters(tmp_path):
    model = two_ratio_bert()
    before = snapshot(model)
    trainer = VariatorTrainer(
        model=model,
        args=training_args(tmp_path / "run"),
        train_dataset=token_dataset(32),
        data_collator=collate,
        ratios_adapters=["ratio4", "ratio2"],
    )
    trainer.train()
    moved = changed(model, before)
    for adapter in ("ratio4", "ratio2"):
        own = {name for name, _ in model.named_parameters() if f".{adapter}." in name}
        assert own and own <= moved

    model.save_pretrained(tmp_path / "saved")
    batch = collate([token_dataset(4)[i] for i in range(4)])
    base = tiny_bert()
    base.load_state_dict(model.get_base_model().state_dict(), strict=False)
    for adapter in ("ratio4", "ratio2"):
        model.set_adapter(adapter)
        with torch.no_grad():
            expected = model(**batch).logits
        path = tmp_path / "saved" / adapter
        reloaded = PeftModel.from_pretrained(fresh_copy_of_base(model), path, adapter_name=adapter)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**batch).logits, expected)
    assert not torch.allclose(expected, base(**batch).logits)


def fresh_copy_of_base(model: PeftModel) -> BertForSequenceClassification:
    """A new tiny BERT holding the (frozen, untouched) base weights of `model`."""
    base = tiny_bert()
    own = {
        name.replace("base_model.model.", "").replace(".base_layer", "").replace(".original_module", ""): parameter
        for name, parameter in model.named_parameters()
        if "variator_" not in name and ".modules_to_save." not in name
    }
    with torch.no_grad():
        for name, parameter in base.named_parameters():
            parameter.copy_(own[name])
    return base


def test_inactive_adapters_stay_frozen_when_one_is_trained(tmp_path):
    model = two_ratio_bert()  # "ratio4" is active
    before = snapshot(model)
    trainer = VariatorTrainer(
        model=model, args=training_args(tmp_path), train_dataset=token_dataset(32), data_collator=collate
    )
    inactive = {name for name, _ in model.named_parameters() if ".ratio2." in name}
    assert not any(parameter.requires_grad for name, parameter in model.named_parameters() if name in inactive)
    trainer.train()
    moved = changed(model, before)
    assert not moved & inactive
    assert {name for name in moved if ".ratio4." in name}
    assert not any(parameter.requires_grad for name, parameter in model.named_parameters() if name in inactive)


def test_adapters_named_by_digits_do_not_mark_each_others_weights_trainable(tmp_path):
    # Adapter "2"'s parameters are named `...variator_up.2.weight`, and layer 2's `...layer.2...` as well.
    model = get_peft_model(
        tiny_bert(layers=3), VariatorConfig(ratio=2, adapter_dim=8, modules_to_save=["classifier"]), adapter_name="2"
    )
    model.add_adapter("4", VariatorConfig(ratio=4, adapter_dim=8, modules_to_save=["classifier"]))
    model.add_adapter("8", VariatorConfig(ratio=8, adapter_dim=8, modules_to_save=["classifier"]))
    VariatorTrainer(model=model, args=training_args(tmp_path), data_collator=collate)  # trains "2", the active one
    plugin_and_head = {
        name: parameter
        for name, parameter in model.named_parameters()
        if "variator_" in name or ".modules_to_save." in name
    }
    trainable = {name.split(".")[-2] for name, parameter in plugin_and_head.items() if parameter.requires_grad}
    assert trainable == {"2"}
    assert [name for name, parameter in plugin_and_head.items() if ".layer.2." in name and ".4." in name]
    assert not any(parameter.requires_grad for name, parameter in plugin_and_head.items() if ".4." in name)


def adapter_logits(model: PeftModel, adapter: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    active = model.active_adapter
    model.set_adapter(adapter)
    with torch.no_grad():
        logits = model(**batch).logits
    model.set_adapter(active)
    return logits


@pytest.mark.parametrize("active", ["ratio4", "ratio8"])
def test_predictions_with_several_ratios_are_the_active_adapters_or_else_the_first_trained(tmp_path, active):
    model = two_ratio_bert()
    model.add_adapter("ratio8", VariatorConfig(ratio=8, adapter_dim=8, modules_to_save=["classifier"]))
    model.set_adapter(active)
    randomize_plugins(model, std=0.3)
    data = token_dataset(8)
    trainer = VariatorTrainer(
        model=model,
        args=training_args(tmp_path, per_device_eval_batch_size=8),
        ratios_adapters=["ratio4", "ratio2"],
        data_collator=collate,
    )
    predictions = torch.from_numpy(trainer.predict(data).predictions)
    batch = collate([data[i] for i in range(8)])
    assert model.active_adapter == active
    # "ratio4": the active adapter when it is trained, the first of `ratios_adapters` when it is not ("ratio8").
    torch.testing.assert_close(predictions, adapter_logits(model, "ratio4", batch))
    assert not torch.allclose(predictions, adapter_logits(model, "ratio2", batch), atol=1e-3)


# Checkpoints


def checkpoint_tensors(path) -> set[str]:
    with safe_open(os.path.join(path, "adapter_model.safetensors"), framework="pt") as file:
        return set(file.keys())


def test_checkpoints_hold_only_plugin_and_head_weights(tmp_path):
    model = variator_bert(modules_to_save=["classifier"])
    trainer = VariatorTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
        train_dataset=token_dataset(16),
        data_collator=collate,
    )
    trainer.train()
    checkpoint = tmp_path / "checkpoint-2"
    assert not (checkpoint / "model.safetensors").exists()
    names = checkpoint_tensors(checkpoint)
    plugin_tensors = {name for name, _ in model.named_parameters() if "variator_" in name}
    assert len(names) == len(plugin_tensors) + 2  # + classifier weight and bias
    assert all("variator_" in name or name.endswith(("classifier.weight", "classifier.bias")) for name in names)


def test_resume_from_checkpoint_ends_where_an_uninterrupted_run_ends(tmp_path):
    def run(output_dir, resume=None, max_steps=6):
        torch.manual_seed(0)
        model = variator_bert(modules_to_save=["classifier"])
        args = training_args(output_dir, max_steps=max_steps, save_strategy="steps", save_steps=3)
        trainer = VariatorTrainer(model=model, args=args, train_dataset=token_dataset(48), data_collator=collate)
        trainer.train(resume_from_checkpoint=resume)
        return model

    uninterrupted = run(tmp_path / "full")
    run(tmp_path / "cut", max_steps=3)
    resumed = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-3"))
    full_state, resumed_state = uninterrupted.state_dict(), resumed.state_dict()
    trained = [name for name, parameter in uninterrupted.named_parameters() if parameter.requires_grad]
    assert trained
    for name in trained:
        torch.testing.assert_close(resumed_state[name], full_state[name])


def test_resume_keeps_training_every_ratio_adapter(tmp_path):
    def run(output_dir, resume=None, max_steps=4):
        torch.manual_seed(0)
        model = two_ratio_bert()
        args = training_args(output_dir, max_steps=max_steps, save_strategy="steps", save_steps=2)
        trainer = VariatorTrainer(
            model=model,
            args=args,
            train_dataset=token_dataset(32),
            data_collator=collate,
            ratios_adapters=["ratio4", "ratio2"],
        )
        trainer.train(resume_from_checkpoint=resume)
        return model

    uninterrupted = run(tmp_path / "full")
    run(tmp_path / "cut", max_steps=2)
    resumed = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-2"))
    full_state, resumed_state = uninterrupted.state_dict(), resumed.state_dict()
    for name in full_state:
        if "variator_" in name or ".modules_to_save." in name:
            torch.testing.assert_close(resumed_state[name], full_state[name])


def test_load_best_model_at_end_loads_the_best_checkpoints_named_adapter(tmp_path):
    model = get_peft_model(tiny_bert(), VariatorConfig(ratio=4, adapter_dim=8), adapter_name="ratio4")
    randomize_plugins(model, std=0.2)
    args = training_args(
        tmp_path,
        max_steps=3,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        per_device_eval_batch_size=8,
        load_best_model_at_end=True,
        # Training lowers the loss, so "best" = highest makes the first checkpoint the best, not the last one.
        metric_for_best_model="loss",
        greater_is_better=True,
    )
    trainer = VariatorTrainer(
        model=model,
        args=args,
        task_weight=0.0,
        train_dataset=token_dataset(24, "none"),
        eval_dataset=token_dataset(8, "none", seed=1),
        data_collator=collate,
    )
    trainer.train()
    eval_losses = {entry["step"]: entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry}
    assert max(eval_losses, key=eval_losses.get) == 1
    assert eval_losses[1] > eval_losses[3] * 1.01
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-1")
    assert trainer.evaluate()["eval_loss"] == pytest.approx(eval_losses[1], rel=1e-5)


# Trainer features that must keep working


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("ratios_adapters", [None, ["ratio4", "ratio2"]])
def test_gradient_checkpointing_trains_to_the_weights_of_training_without_it(
    tmp_path, ratios_adapters, use_reentrant, checkpointing_means
):
    """Also with several ratios, whose students run one after the other before one backward of their summed losses:
    each checkpointed layer is recomputed with the adapter its student ran, not the one active by then. A model that
    checkpoints by other means trains one ratio, next to its teacher's forward; several are refused at the backward,
    which cannot tell which of them ran the first layer."""

    def run(output_dir, **overrides):
        torch.manual_seed(0)
        model = variator_bert() if ratios_adapters is None else two_ratio_bert()
        randomize_plugins(model, std=0.2)
        trainer = VariatorTrainer(
            model=model,
            args=training_args(output_dir, max_steps=3, **overrides),
            ratios_adapters=ratios_adapters,
            train_dataset=token_dataset(24),
            data_collator=collate,
        )
        before = snapshot(model)
        trainer.train()
        return model, before

    plain, before = run(tmp_path / "plain")
    checkpointing = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if ratios_adapters and checkpointing_means == "direct":
        with pytest.raises(RuntimeError, match="cannot switch back"):
            run(tmp_path / "checkpointed", **checkpointing)
        return
    checkpointed, _ = run(tmp_path / "checkpointed", **checkpointing)
    assert checkpointed.get_base_model().is_gradient_checkpointing
    moved = changed(checkpointed, before)
    assert {name.split(".")[-2] for name in moved if "variator_" in name} == set(ratios_adapters or ["default"])
    plain_state = plain.state_dict()
    for name, value in checkpointed.state_dict().items():
        torch.testing.assert_close(value, plain_state[name], msg=name)


def test_mixed_precision_keeps_plugin_weights_in_float32(tmp_path):
    model = variator_bert()
    before = snapshot(model)
    trainer = VariatorTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=2, bf16=True),
        train_dataset=token_dataset(16),
        data_collator=collate,
    )
    trainer.train()
    plugins = {name: parameter for name, parameter in model.named_parameters() if "variator_" in name}
    assert {parameter.dtype for parameter in plugins.values()} == {torch.float32}
    assert set(plugins) == changed(model, before)


def test_plain_trainer_trains_plugins_and_head_with_the_task_loss(tmp_path):
    model = variator_bert(modules_to_save=["classifier"])
    before = snapshot(model)
    trainer = Trainer(
        model=model, args=training_args(tmp_path), train_dataset=token_dataset(32), data_collator=collate
    )
    result = trainer.train()
    assert result.training_loss > 0
    moved = changed(model, before)
    assert moved == {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("variator_" in name for name in moved)
    assert any(".modules_to_save." in name for name in moved)


def test_evaluate_and_predict_report_the_loss_and_the_logits_only(tmp_path):
    model = variator_bert()
    data = token_dataset(12)
    trainer = VariatorTrainer(
        model=model,
        args=training_args(tmp_path, per_device_eval_batch_size=4),
        eval_dataset=data,
        data_collator=collate,
    )
    assert trainer.evaluate()["eval_loss"] > 0
    prediction = trainer.predict(data)
    assert prediction.predictions.shape == (12, 3)


def test_evaluate_on_unlabelled_text_reports_the_distillation_loss(tmp_path):
    # Plugin pre-training has no labels; the Trainer alone would report no loss at all.
    model = variator_llama()
    randomize_plugins(model, std=0.2)
    data = token_dataset(8, "none")
    trainer = VariatorTrainer(
        model=model,
        args=training_args(tmp_path, per_device_eval_batch_size=8),
        task_weight=0.0,
        decode_tokens=0,  # the student then runs as the forward below does
        eval_dataset=data,
        data_collator=collate,
    )
    batch = collate([data[i] for i in range(8)])
    with torch.no_grad():
        with model.disable_adapter():
            teacher = model(**batch, output_hidden_states=True).hidden_states[-1]
        student = model(**batch, output_hidden_states=True).hidden_states[-1]
    expected = masked_mse(student, teacher, batch["attention_mask"]).item()
    assert expected > 0
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected, rel=1e-4)
    assert trainer.predict(data).predictions.shape[:2] == batch["input_ids"].shape


def test_the_trainers_model_card_keeps_the_variator_section(tmp_path):
    trainer = VariatorTrainer(
        model=two_ratio_bert(), args=training_args(tmp_path), ratios_adapters=["ratio4", "ratio2"]
    )
    trainer.save_model()
    trainer.create_model_card(model_name="tiny-variator")  # what `Trainer.push_to_hub` writes before uploading
    card = (tmp_path / "README.md").read_text()
    assert "## Variator compression plugins" in card
    assert "variator-ratio-2" in card
    assert "variator-ratio-4" in card
    assert 'model.load_adapter(repo_id, adapter_name="ratio4", subfolder="ratio4")' in card


# A real model


def test_short_run_on_real_minilm_reduces_the_distillation_loss(tmp_path, minilm_path):
    from peft_variator.data import load_tweets, tokenize

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=3)
    model = get_peft_model(model, VariatorConfig(ratio=4))
    data = tokenize(load_tweets()["train"].select(range(64)), tokenizer, max_length=32)
    trainer = VariatorTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=6, learning_rate=1e-3),
        task_weight=0.0,
        train_dataset=data,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    batch = DataCollatorWithPadding(tokenizer)([data[i] for i in range(16)])
    batch.pop("labels")
    before_loss = distillation_loss(trainer, batch)
    trainer.train()
    assert distillation_loss(trainer, batch) < 0.9 * before_loss
