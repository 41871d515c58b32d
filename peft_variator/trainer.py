"""Training Variator plugins the paper's way, on top of `transformers.Trainer`.

Variator trains each plugin to make the compressed model behave like the uncompressed one (Xiao et al., 2023,
arXiv 2310.15724, Sec. 3.3): the loss is the task loss plus the mean squared error between the hidden states of the
model with plugins (the student) and without them (the teacher). The teacher is the same model with its adapters
disabled, so no second copy is kept in memory.

`VariatorTrainer` only changes `compute_loss` (and which parameters the optimizer receives when several ratios are
trained at once), so accelerate, DDP, gradient accumulation, mixed precision, gradient checkpointing, checkpoints,
`resume_from_checkpoint` and logging are `transformers.Trainer`'s own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn
from transformers import Trainer
from transformers.trainer_pt_utils import nested_detach

from .architectures import layer_index
from .config import VariatorConfig
from .hub import complete_card, saved_adapters
from .layer import VariatorLayer
from .model import is_causal_lm
from .padding import packed_sequences, padding_context
from .registration import PREFIX

_DISTILL_LAYERS = ("last", "all")
# A prompt's last token and the first generated ones: enough positions per sequence for the logits KL while most of
# a short (tweet-sized) training text stays compressed.
DEFAULT_DECODE_TOKENS = 8


class VariatorTrainer(Trainer):
    """A `transformers.Trainer` whose loss trains Variator plugins by distillation from the uncompressed model.

    For each batch the model first runs once with its adapters disabled and without gradients (the teacher), then
    once per trained adapter (the students). The loss, summed over the students, is

        task_weight * the model's own loss (when the batch has `labels`)
        + distill_weight * MSE(student hidden states, teacher hidden states) over real (non-padded) tokens
        + logits_weight * T^2 * KL(teacher logits / T || student logits / T)

    All other keyword arguments are `transformers.Trainer`'s.

    Args:
        distill_weight (`float`): Weight of the hidden-state MSE. The MSE is averaged over the hidden size and over
            the tokens with `attention_mask == 1`, so padding never counts.
        task_weight (`float`): Weight of the loss the model returns for `labels`. Must be 0 for causal language
            models: their prompt is compressed, so a language-modelling loss through the plugins would let each
            position read the tokens it has to predict.
        distill_layers (`str`): `"last"`: match the last hidden states, as the reference implementation does.
            `"all"`: match the output of every layer whose FFN is compressed, averaged over those layers.
        logits_weight (`float`): Weight of the KL divergence between teacher and student logits (0 disables it).
            For sequence logits `(batch, seq, vocab)` only real tokens count.
        logits_temperature (`float`): Softmax temperature of that KL divergence (Hinton et al., 2015).
        ratios_adapters (`list[str]`, *optional*): Names of several loaded Variator adapters (e.g. one per ratio) to
            train together: one teacher forward per batch, then one student forward per adapter, their losses
            summed. All of them are trained and saved as separate named adapters. When unset, the active adapter is
            trained and any other loaded adapter stays frozen.
        decode_tokens (`int`, *optional*): Causal language models only. At inference the prompt is compressed but
            its last token and every generated token run exact, attending to the compressed prompt; only their logits
            are ever read. So while training, the last `decode_tokens` real tokens of each sequence run exact as well
            (standing for the generated ones) and the logits KL counts those positions only; the hidden-state MSE
            still counts every real token. Defaults to 8 for causal LMs whose adapters keep the last token exact
            (`exact_last_token`, their default), 0 otherwise. Measured on SmolLM2-135M (docs/benchmarks.md):
            first-token agreement 66.4 % against 62.0 % without it, same steps.

    Example:

        ```py
        >>> model = get_peft_model(model, VariatorConfig(ratio=4), adapter_name="ratio4")
        >>> model.add_adapter("ratio8", VariatorConfig(ratio=8))
        >>> trainer = VariatorTrainer(
        ...     model=model, args=args, train_dataset=train, task_weight=0.0, ratios_adapters=["ratio4", "ratio8"]
        ... )
        >>> trainer.train()
        ```
    """

    # The loss is a per-batch mean, so the Trainer divides it by the gradient accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        distill_weight: float = 1.0,
        task_weight: float = 1.0,
        distill_layers: str = "last",
        logits_weight: float = 0.0,
        logits_temperature: float = 1.0,
        ratios_adapters: list[str] | None = None,
        decode_tokens: int | None = None,
        **kwargs: Any,
    ) -> None:
        for name, value in (
            ("distill_weight", distill_weight),
            ("task_weight", task_weight),
            ("logits_weight", logits_weight),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"`{name}` must be a number >= 0, got {value!r}.")
        if distill_weight == task_weight == logits_weight == 0:
            raise ValueError(
                "`distill_weight`, `task_weight` and `logits_weight` are all 0: there is nothing to train."
            )
        if distill_layers not in _DISTILL_LAYERS:
            raise ValueError(f"`distill_layers` must be one of {_DISTILL_LAYERS}, got {distill_layers!r}.")
        if not isinstance(logits_temperature, (int, float)) or logits_temperature <= 0:
            raise ValueError(f"`logits_temperature` must be a number > 0, got {logits_temperature!r}.")
        model = kwargs.get("model", args[0] if args else None)
        self.trained_adapters = _trained_adapters(model, ratios_adapters)
        self.distill_weight = float(distill_weight)
        self.task_weight = float(task_weight)
        self.distill_layers = distill_layers
        self.logits_weight = float(logits_weight)
        self.logits_temperature = float(logits_temperature)
        self._is_causal_lm = _is_causal_lm(model)
        base_config = getattr(model.get_base_model(), "config", None)
        self._is_encoder_decoder = bool(getattr(base_config, "is_encoder_decoder", False))
        self.decode_tokens = _decode_tokens(model, self.trained_adapters, self._is_causal_lm, decode_tokens)
        self._compressed_layers = {name: _compressed_layers(model, name) for name in self.trained_adapters}
        _set_trainable(model, self.trained_adapters)
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if len(self.trained_adapters) > 1 and training_args is not None:
            # With several students per batch, DDP's search for unused parameters (the Trainer's default for PEFT
            # models) walks only the last student's graph and then marks the other students' parameters ready a
            # second time. Every trained adapter gets a gradient from the summed loss, so the search is not needed.
            # The Trainer reads this flag when it builds its Accelerator, inside `__init__`.
            if training_args.ddp_find_unused_parameters:
                raise ValueError(
                    "`ddp_find_unused_parameters=True` cannot be used with several `ratios_adapters`: DDP would mark "
                    "the parameters of all but the last adapter ready twice. Leave it unset (VariatorTrainer sets it "
                    "to False) or train one adapter per run."
                )
            training_args.ddp_find_unused_parameters = False
        super().__init__(*args, **kwargs)

    def create_optimizer(self, *args: Any, **kwargs: Any):
        # `resume_from_checkpoint` reloads every adapter but the active one with `is_trainable=False`, and
        # `set_adapter` freezes inactive adapters: make sure the optimizer sees every trained adapter.
        _set_trainable(self.accelerator.unwrap_model(self.model), self.trained_adapters)
        return super().create_optimizer(*args, **kwargs)

    def _load_best_model(self) -> None:
        # The Trainer looks for the best checkpoint's adapter at its root, where PEFT writes only one named
        # `default`; every other adapter (`adapter_name="ratio4"`, several ratios) is in a subfolder and would be
        # silently left at the last step's weights. Resuming reads subfolders, so the best checkpoint is loaded alike.
        checkpoint = self.state.best_model_checkpoint
        peft_model = self.accelerator.unwrap_model(self.model)
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled  # their own loading, left to the Trainer
        if not sharded and any(name != "default" for name in saved_adapters(peft_model, checkpoint)):
            self._load_from_checkpoint(checkpoint)
            _set_trainable(peft_model, self.trained_adapters)
        else:
            super()._load_best_model()

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        # `Trainer.push_to_hub` writes the Trainer's own card over the one `save_pretrained` completed.
        super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            complete_card(self.accelerator.unwrap_model(self.model), self.args.output_dir)

    def training_step(self, model: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Backward is inside: checkpointed layers recompute their forward there and must plan the same groups.
        with _exact_decode_tokens(self.accelerator.unwrap_model(model), self.decode_tokens):
            return super().training_step(model, *args, **kwargs)

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, Any, Any]:
        with _exact_decode_tokens(self.accelerator.unwrap_model(model), self.decode_tokens):
            if any(inputs.get(name) is not None for name in self.label_names):
                return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
            # Unlabelled text (plugin pre-training): the Trainer reports no loss without labels, but distillation
            # needs none, so `evaluate()` gets its `eval_loss` all the same.
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
            if prediction_loss_only:
                return loss.detach(), None, None
            if ignore_keys is None:
                config = getattr(self.model, "config", None)
                # The KV cache is no prediction; transformers 5.24 renamed the output `past_key_values` to `cache`.
                ignore_keys = getattr(config, "keys_to_ignore_at_inference", ["cache", "past_key_values"])
            logits = tuple(value for key, value in outputs.items() if key not in (*ignore_keys, "loss"))
            return loss.detach(), nested_detach(logits[0] if len(logits) == 1 else logits), None

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        peft_model = self.accelerator.unwrap_model(model)
        # A forward taking `**kwargs` (remote code) gives the Trainer no label names; it still trains on `labels`.
        label_names = self.label_names or ["labels"]
        labels = {name: inputs[name] for name in label_names if inputs.get(name) is not None}
        use_task_loss = self.task_weight > 0 and bool(labels)
        if use_task_loss and self._is_causal_lm:
            raise ValueError(
                "`task_weight` must be 0 when training Variator plugins of a causal language model on batches with "
                "`labels`: the plugins compress the prompt, so a language-modelling loss through them would let each "
                "position read the tokens it must predict. Train with distillation only (`task_weight=0`)."
            )
        if not use_task_loss and self.distill_weight == self.logits_weight == 0:
            raise ValueError(
                f"This batch has no labels ({label_names}), and `task_weight` is the only "
                "nonzero loss weight: there is nothing to train on. Give the batches labels (or set "
                "`TrainingArguments(label_names=...)`), or set `distill_weight` / `logits_weight` > 0."
            )
        unlabelled = {key: value for key, value in inputs.items() if key not in labels}
        if self._is_encoder_decoder:
            unlabelled.update(_decoder_inputs(peft_model, inputs))
        # With a label smoother or `compute_loss_func` the Trainer computes the task loss itself, from the logits of
        # a call without labels; so does this trainer.
        has_loss_function = self.label_smoother is not None or self.compute_loss_func is not None
        external_task_loss = use_task_loss and "labels" in labels and has_loss_function
        student_inputs = inputs if use_task_loss and not external_task_loss else unlabelled
        active = peft_model.active_adapter

        # The unwrapped model skips DDP's gradient bookkeeping; accelerate's autocast is on it all the same.
        with peft_model.disable_adapter(), torch.no_grad():
            teacher = peft_model(**unlabelled, output_hidden_states=True, return_dict=True)

        loss = None
        reported = None
        for adapter in self.trained_adapters:
            if adapter != peft_model.active_adapter:
                peft_model.set_adapter(adapter)
            # `disable_adapter` and `set_adapter` both switch `requires_grad` off for adapters they consider
            # inactive; every trained adapter must keep it on for its gradients (and DDP's hooks) to run.
            _set_trainable(peft_model, self.trained_adapters)
            outputs = model(**student_inputs, output_hidden_states=True, return_dict=True)
            task_loss = None
            if external_task_loss:
                task_loss = self._external_task_loss(outputs, inputs["labels"], num_items_in_batch)
            elif use_task_loss:
                task_loss = outputs["loss"]
            adapter_loss = self._adapter_loss(adapter, outputs, teacher, inputs, task_loss)
            loss = adapter_loss if loss is None else loss + adapter_loss
            # Predictions (`evaluate`, `predict`) are the active adapter's, or the first trained one's.
            if reported is None or adapter == active:
                reported = outputs
        if peft_model.active_adapter != active:
            peft_model.set_adapter(active)
            _set_trainable(peft_model, self.trained_adapters)
        if not return_outputs:
            return loss
        # Evaluation collects every output but the loss as predictions; the hidden states were only asked for here.
        kept = {key: value for key, value in reported.items() if key not in ("hidden_states", "encoder_hidden_states")}
        return loss, type(reported)(**kept)

    def _external_task_loss(
        self, outputs: Any, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None
    ) -> torch.Tensor:
        if self.compute_loss_func is not None:
            return self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        return self.label_smoother(outputs, labels)

    def _adapter_loss(
        self, adapter: str, student: Any, teacher: Any, inputs: dict[str, Any], task_loss: torch.Tensor | None
    ) -> torch.Tensor:
        loss = torch.zeros((), device=_first_tensor(student).device)
        if task_loss is not None:
            loss = loss + self.task_weight * task_loss
        mask = inputs.get("attention_mask")
        if self.distill_weight > 0:
            pairs = list(zip(_hidden_states(student), _hidden_states(teacher), strict=True))
            if self.distill_layers == "last":
                pairs = pairs[-1:]
            else:
                # hidden_states[0] is the embedding output; hidden_states[i + 1] is layer i's output.
                layers = self._compressed_layers[adapter]
                pairs = [pairs[i + 1] for i in layers] if layers else pairs[1:]
            mse = torch.stack([masked_mse(s, t, mask) for s, t in pairs]).mean()
            loss = loss + self.distill_weight * mse
        if self.logits_weight > 0:
            if student.get("logits") is None:
                raise ValueError(
                    f"`logits_weight` > 0 needs a model that returns `logits`; {type(student).__name__} has "
                    f"{[key for key, value in student.items() if value is not None]}. Use a model with a head (e.g. "
                    "`AutoModelForSequenceClassification`) or set `logits_weight=0`."
                )
            kl = logits_kl(student["logits"], teacher["logits"], self._logits_mask(inputs), self.logits_temperature)
            loss = loss + self.logits_weight * kl
        return loss

    def _logits_mask(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        """Which logits the KL counts: `(B, N)`, or None for all of them."""
        if self._is_encoder_decoder:
            # The logits are the decoder's: its own mask, or the positions that have a label.
            if inputs.get("decoder_attention_mask") is not None:
                return inputs["decoder_attention_mask"]
            labels = inputs.get("labels")
            return None if labels is None else labels != -100
        mask = inputs.get("attention_mask")
        if self.decode_tokens and mask is not None:
            return last_real_tokens(mask, self.decode_tokens)
        if self.decode_tokens and mask is None:
            # The exact tokens are the last ones of every sequence: of each row, or of every sequence packed into a
            # row (a padding-free batch).
            sequence_index = packed_sequences(inputs.get("position_ids"))
            tokens = inputs.get("input_ids", inputs.get("inputs_embeds"))
            if sequence_index is None and tokens is not None:
                sequence_index = torch.zeros(tokens.shape[:2], dtype=torch.long, device=tokens.device)
            if sequence_index is not None:
                return last_packed_tokens(sequence_index, self.decode_tokens)
        return mask


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error of `(B, N, H)` hidden states over the tokens where `mask` `(B, N)` is nonzero.

    Averaged over the hidden size, then over real tokens, in float32 (bf16 squares lose most of their digits).
    """
    per_token = (student.float() - teacher.float()).pow(2).mean(dim=-1)
    if mask is None:
        return per_token.mean()
    weights = mask[:, -per_token.shape[1] :].to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp(min=1)


def logits_kl(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher || student) of softened logits, times T^2 so its gradients keep their scale as T changes.

    `(B, C)` logits are averaged over the batch; `(B, N, V)` logits over the tokens where `mask` `(B, N)` is nonzero.
    """
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_row = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1) * temperature**2
    if per_row.dim() == 1 or mask is None:
        return per_row.mean()
    weights = mask[:, -per_row.shape[1] :].to(per_row.dtype)
    return (per_row * weights).sum() / weights.sum().clamp(min=1)


def last_real_tokens(mask: torch.Tensor, count: int) -> torch.Tensor:
    """`(B, N)` mask of the last `count` real tokens of each sequence (all of them in shorter ones)."""
    real = mask.bool()
    rank = real.long().cumsum(dim=1)
    return real & (rank > rank[:, -1:] - count)


def last_packed_tokens(sequence_index: torch.Tensor, count: int) -> torch.Tensor:
    """`(B, N)` mask of the last `count` tokens of each sequence packed into the rows (`packed_sequences`)."""
    # A token is among the last `count` of its sequence when the token `count` places on is in another one (or none).
    ahead = F.pad(sequence_index, (0, count), value=-1)[:, count:]
    return ahead != sequence_index


@contextlib.contextmanager
def _exact_decode_tokens(peft_model: PeftModel, count: int) -> Iterator[None]:
    context = padding_context(peft_model.base_model.model)
    previous, context.decode_tokens = context.decode_tokens, count
    try:
        yield
    finally:
        context.decode_tokens = previous


def _decode_tokens(model: PeftModel, adapters: list[str], is_causal_lm: bool, decode_tokens: int | None) -> int:
    exact = [name for name in adapters if model.peft_config[name].exact_last_token]
    if decode_tokens is None:
        return DEFAULT_DECODE_TOKENS if is_causal_lm and len(exact) == len(adapters) else 0
    if isinstance(decode_tokens, bool) or not isinstance(decode_tokens, int) or decode_tokens < 0:
        raise ValueError(f"`decode_tokens` must be an integer >= 0, got {decode_tokens!r}.")
    if decode_tokens > 0 and not is_causal_lm:
        raise ValueError(
            f"`decode_tokens={decode_tokens}` is for causal language models, whose generated tokens run exact; "
            f"this is a {type(model.get_base_model()).__name__}. Leave it unset (0)."
        )
    if decode_tokens > 0 and len(exact) != len(adapters):
        inexact = [name for name in adapters if name not in exact]
        raise ValueError(
            f"`decode_tokens={decode_tokens}` trains for a last prompt token that runs exact, but adapters {inexact} "
            "compress it (`exact_last_token=False`). Set `decode_tokens=0` or use `exact_last_token=True`."
        )
    return decode_tokens


def _hidden_states(outputs: Any) -> tuple[torch.Tensor, ...]:
    # Encoder-decoders compress their encoder only, so the encoder's states are the ones to match.
    states = outputs.get("encoder_hidden_states") or outputs.get("hidden_states")
    if states is None:
        raise ValueError(
            f"{type(outputs).__name__} has no hidden states although the model was called with "
            "`output_hidden_states=True`; VariatorTrainer needs them for the distillation loss."
        )
    return states


def _decoder_inputs(model: PeftModel, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The decoder inputs an encoder-decoder builds from `labels` itself, for the calls made without them."""
    base = model.get_base_model()
    labels = inputs.get("labels")
    if (
        labels is None
        or inputs.get("decoder_input_ids") is not None
        or inputs.get("decoder_inputs_embeds") is not None
        or not hasattr(base, "prepare_decoder_input_ids_from_labels")
    ):
        return {}
    return {"decoder_input_ids": base.prepare_decoder_input_ids_from_labels(labels=labels)}


def _first_tensor(outputs: Any) -> torch.Tensor:
    return next(value for value in outputs.values() if isinstance(value, torch.Tensor))


def _variator_peft_model(model: Any) -> PeftModel:
    if not isinstance(model, PeftModel) or not any(isinstance(c, VariatorConfig) for c in model.peft_config.values()):
        raise ValueError(
            "VariatorTrainer trains Variator plugins: pass `model=get_peft_model(model, VariatorConfig(...))`, got "
            f"{type(model).__name__}."
        )
    return model


def _trained_adapters(model: Any, ratios_adapters: list[str] | None) -> list[str]:
    peft_model = _variator_peft_model(model)
    variator_adapters = sorted(n for n, c in peft_model.peft_config.items() if isinstance(c, VariatorConfig))
    if ratios_adapters is None:
        return [peft_model.active_adapter]
    if isinstance(ratios_adapters, str) or not ratios_adapters or len(set(ratios_adapters)) != len(ratios_adapters):
        raise ValueError(
            f"`ratios_adapters` must be a non-empty list of distinct adapter names, got {ratios_adapters!r}."
        )
    unknown = [name for name in ratios_adapters if name not in variator_adapters]
    if unknown:
        raise ValueError(
            f"`ratios_adapters` names {unknown}, which are not Variator adapters of this model; "
            f"loaded Variator adapters: {variator_adapters}. Add them first with `model.add_adapter(name, config)`."
        )
    return list(ratios_adapters)


def _set_trainable(model: nn.Module, adapters: list[str]) -> None:
    """Plugin and `modules_to_save` weights of `adapters` require gradients; those of every other adapter do not."""
    for name, parameter in model.named_parameters():
        adapter = _adapter_of(name)
        if adapter is not None:
            parameter.requires_grad = adapter in adapters


def _adapter_of(parameter_name: str) -> str | None:
    """The adapter a plugin or `modules_to_save` parameter belongs to: the name after its `ModuleDict`'s (one
    adapter's name may be part of another's, e.g. `4` and `ratio4`)."""
    parts = parameter_name.split(".")
    for part, following in zip(parts, parts[1:], strict=False):
        if part.startswith(PREFIX) or part == "modules_to_save":
            return following
    return None


def _compressed_layers(model: PeftModel, adapter: str) -> list[int]:
    """Indices of the transformer layers whose FFN has a plugin of `adapter`, in order."""
    pattern = model.peft_config[adapter].layers_pattern
    indices = {
        layer_index(name, pattern)
        for name, module in model.named_modules()
        if isinstance(module, VariatorLayer) and adapter in module.ratio
    }
    return [] if None in indices else sorted(indices)


def _is_causal_lm(model: PeftModel) -> bool:
    if any(config.task_type == "CAUSAL_LM" for config in model.peft_config.values()):
        return True
    return is_causal_lm(model.get_base_model())
