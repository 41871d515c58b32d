"""`VariatorModel`: the PEFT tuner that decides where Variator plugins go."""

from __future__ import annotations

import copy

from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .architectures import (
    FFN_LOCATIONS,
    base_named_modules,
    ffn_role,
    find_ffns,
    hidden_size_of,
    layer_index,
    linear_shapes,
    more_than_an_ffn,
    own_width_ffn,
    pair_split_halves,
    parallel_inputs,
)
from .config import VariatorConfig
from .layer import (
    SplitFFNState,
    VariatorFFN,
    VariatorFFNInput,
    VariatorFFNOutput,
    VariatorLayer,
    check_one_adapter,
    offloading_hook,
)
from .padding import detach_padding_context, padding_context
from .registration import PREFIX

_MERGE_ERROR = (
    "Variator compresses the sequence inside each FFN; that cannot be folded into weights, so "
    "`merge_and_unload()` / `merge_adapter()` are not available. Use `unload()` to get the untouched base model "
    "back, or keep the plugins and pick one with `set_adapter` (or none with `disable_adapter()`)."
)


# Architectures whose layers see (seq_len, batch, hidden).
SEQUENCE_FIRST_MODEL_TYPES = frozenset({"fsmt", "xlnet"})


class VariatorModel(BaseTuner):
    """Attaches Variator compression plugins to the FFNs of a transformer (Xiao et al., 2023, arXiv 2310.15724).

    Used through PEFT: `get_peft_model(model, VariatorConfig(ratio=4))`. Several adapters (e.g. one per ratio) can be
    loaded; exactly one runs at a time, and `set_adapter` switches between them without copying weights.

    Example:

        ```py
        >>> import peft_variator
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_variator.VariatorConfig(ratio=4))
        >>> model.add_adapter("ratio8", peft_variator.VariatorConfig(ratio=8))
        >>> model.set_adapter("ratio8")
        ```
    """

    prefix: str = PREFIX
    tuner_layer_cls = VariatorLayer
    target_module_mapping = {model_type: location.target_modules() for model_type, location in FFN_LOCATIONS.items()}

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self._update_model_tags()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._update_model_tags()

    def _update_model_tags(self) -> None:
        # transformers writes `model_tags` into the model card on `push_to_hub` / `save_pretrained` (TRL tags its
        # models the same way), so the card names the method and every ratio carried.
        if not hasattr(self.model, "add_model_tags"):
            return
        _remove_variator_tags(self.model)
        ratios = sorted({config.ratio for config in self.peft_config.values() if isinstance(config, VariatorConfig)})
        if ratios:
            self.model.add_model_tags(["variator", *[f"variator-ratio-{ratio}" for ratio in ratios]])

    def _prepare_adapter_config(self, peft_config: VariatorConfig, model_config: dict) -> VariatorConfig:
        if peft_config.target_modules is None:
            location = FFN_LOCATIONS.get(model_config.get("model_type"))
            if location is not None:
                peft_config.target_modules = location.target_modules()
        return peft_config

    def _prepare_model(self, peft_config: VariatorConfig, model: nn.Module) -> None:
        chunk_size = self.get_model_config(model).get("chunk_size_feed_forward") or 0
        if chunk_size > 0:
            # The FFN would run on slices of the sequence, which the layers cannot place within the attention mask.
            raise ValueError(
                f"The model config has `chunk_size_feed_forward={chunk_size}`, which runs the FFN on chunks of the "
                "sequence; Variator groups tokens over the whole sequence and needs it to be 0. Set "
                "`model.config.chunk_size_feed_forward = 0` first (the base model's outputs do not change)."
            )
        model_type = self.get_model_config(model).get("model_type")
        if model_type in SEQUENCE_FIRST_MODEL_TYPES:
            # Layers get (seq_len, batch, hidden); with as many sequences as tokens, no run-time check could tell.
            raise ValueError(
                f"{model_type!r} models run their layers sequence-first, (seq_len, batch, hidden); Variator groups "
                "consecutive tokens of (batch, seq_len, hidden) and does not support them."
            )
        if peft_config.exact_last_token is None:
            peft_config.exact_last_token = peft_config.task_type == "CAUSAL_LM" or is_causal_lm(model)
        if peft_config.target_modules is None:
            hidden_size = hidden_size_of(self.get_model_config(model))
            found = []
            if hidden_size is not None:
                is_encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
                found = find_ffns(model, hidden_size, within=model.get_encoder() if is_encoder_decoder else None)
            if not found:
                raise ValueError(
                    f"Variator found no FFN (a block mapping hidden -> intermediate -> hidden) in "
                    f"{type(model).__name__}. Pass the FFN modules explicitly, e.g. "
                    "`VariatorConfig(target_modules=['mlp'])`."
                )
            peft_config.target_modules = found
        self._split_pairs = self._plan_targets(peft_config, model)
        padding_context(model)

    def _plan_targets(self, peft_config: VariatorConfig, model: nn.Module) -> dict[str, str]:
        """Check every matched module before anything is replaced, and pair the halves of split FFNs."""
        hidden_size = hidden_size_of(self.get_model_config(model))
        encoder = _encoder_name(model)
        roles: dict[str, list[str]] = {"input": [], "output": []}
        wrappers = [key for key, module in model.named_modules() if isinstance(module, VariatorLayer)]
        offloaded = [key for key, module in model.named_modules() if offloading_hook(module) is not None]
        # Names as the base model has them: an FFN wrapped by an earlier adapter is planned as the module it wraps.
        for key, module in base_named_modules(model):
            if not key or not self._check_target_module_exists(peft_config, key):
                continue
            _refuse_nesting(key, wrappers)
            if not isinstance(model.get_submodule(key), VariatorLayer):  # an earlier adapter's plugins are in place
                _refuse_offloaded(key, offloaded)
            if encoder is not None and not key.startswith(encoder + "."):
                # The decoder is causal and its padding is not the encoder's mask, the one the layers are given.
                raise ValueError(
                    f"Variator compresses the encoder of an encoder-decoder model only, but `target_modules` matches "
                    f"{key!r}, outside the encoder ({encoder!r}). Narrow `target_modules` to the encoder's FFNs, or "
                    "leave it unset to take the default."
                )
            role, width = ffn_role(module, key, hidden_size), hidden_size
            if role is None and (own_width := own_width_ffn(model, key, module)) is not None:
                # A whole FFN of another width than the model's, named as a target: a vision tower's next to a wider
                # language model. Its plugin takes its own width.
                role, width = "ffn", own_width
            if role is None:
                raise ValueError(
                    f"Variator targets must be FFNs (hidden -> intermediate -> hidden), but {key!r} "
                    f"({type(module).__name__}) has linear layers {linear_shapes(module)}. Pass the module holding "
                    "the whole FFN in `target_modules`."
                )
            reason = more_than_an_ffn(module, width) if role == "ffn" else None
            if reason is not None:
                raise ValueError(
                    f"Variator targets must be FFNs, but {key!r} ({type(module).__name__}) is more than one: "
                    f"{reason}. Target the FFN inside it, or its two linear layers (hidden -> intermediate and "
                    "intermediate -> hidden) as the halves of a split FFN."
                )
            if role == "input":
                parent_key, _, half = key.rpartition(".")
                parallel = parallel_inputs(model.get_submodule(parent_key), half)
                if parallel:
                    raise ValueError(
                        f"{key!r} is not the first half of an FFN on its own: {parallel} next to it read the same "
                        f"hidden states (a gated FFN). Target the module holding the whole FFN ({parent_key!r})."
                    )
            if role in roles:
                roles[role].append(key)
        return pair_split_halves(roles["input"], roles["output"])

    @staticmethod
    def _check_target_module_exists(peft_config: VariatorConfig, key: str):
        if peft_config.layers_to_transform is None:
            return check_target_module_exists(peft_config, key)
        # PEFT applies `layers_to_transform` only to names matched by suffix (neither to a regex, Variator's defaults
        # by model type, nor to an exact full name, the FFNs Variator finds by structure), and there it finds no layer
        # index in a layer list at the model's root (`layers.1.mlp` of a bare `LlamaModel`). Matched here without
        # it, and the layer rule applied to every match.
        without_layers = copy.copy(peft_config)
        without_layers.layers_to_transform = None
        found = check_target_module_exists(without_layers, key)
        if found:
            found = layer_index(key, peft_config.layers_pattern) in _as_list(peft_config.layers_to_transform)
        return found

    def _create_and_replace(
        self,
        peft_config: VariatorConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs,
    ) -> None:
        if isinstance(target, VariatorLayer):
            target.update_layer(adapter_name, peft_config)
            return
        padding = padding_context(self.model)
        role = ffn_role(target, current_key, hidden_size_of(self.get_model_config(self.model)))
        if role == "input":
            new_module = VariatorFFNInput(target, adapter_name, peft_config, padding, SplitFFNState())
        elif role == "output":
            partner = self.model.get_submodule(self._split_pairs[current_key])
            new_module = VariatorFFNOutput(target, adapter_name, peft_config, padding, partner.state)
        else:
            new_module = VariatorFFN(target, adapter_name, peft_config, padding)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for name, parameter in model.named_parameters():
            if self.prefix not in name:
                parameter.requires_grad = False

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = check_one_adapter(adapter_name)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter {unknown[0]!r} not found; loaded adapters: {sorted(self.peft_config)}.")
        super().set_adapter(names[0] if names else names, inference_mode=inference_mode)

    def merge_adapter(self, *args, **kwargs) -> None:
        raise ValueError(_MERGE_ERROR)

    def merge_and_unload(self, *args, **kwargs) -> nn.Module:
        raise ValueError(_MERGE_ERROR)

    def add_weighted_adapter(self, *args, **kwargs) -> None:
        # PEFT offers it for LoRA-like methods only; without this, the call falls through to the base model's
        # AttributeError.
        raise ValueError(
            "Variator adapters cannot be combined into a weighted one: each compresses the sequence its own way (its "
            "ratio decides the groups). Load several and switch between them with `set_adapter` instead."
        )

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs) -> nn.Module:
        if merge:
            raise ValueError(_MERGE_ERROR)
        for name, module in list(self.model.named_modules()):
            if isinstance(module, VariatorLayer):
                unloaded = module.get_base_layer()
            elif hasattr(module, "unload_and_optionally_merge_module"):
                # PEFT's `ModulesToSaveWrapper` (a classification head): the active adapter's trained copy stays, as
                # in PEFT's own `unload()`, so the returned model saves and reloads as a plain transformers model.
                unloaded = module.unload_and_optionally_merge_module(merge=False, safe_merge=False, adapter_names=None)
            else:
                continue
            parent_name, _, child_name = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            # Not `_replace_module`: it copies `.weight`, which a whole FFN block does not have.
            setattr(parent, child_name, unloaded)
        detach_padding_context(self.model)
        _remove_variator_tags(self.model)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model


def _refuse_nesting(target: str, wrappers: list[str]) -> None:
    """Refuse a target around or inside the wrapper of another Variator adapter: nested wrappers would leave a model
    that `unload()` cannot take apart."""
    outer = [name for name in wrappers if target.startswith(name + ".")]
    if outer:
        raise ValueError(
            f"Variator target {target!r} is inside {outer[0]!r}, which another Variator adapter already wraps. All "
            f"Variator adapters of a model must wrap the same FFN modules: target {outer[0]!r}, or leave "
            "`target_modules` unset if that adapter did."
        )
    inner = [name for name in wrappers if name.startswith(target + ".")]
    if inner:
        raise ValueError(
            f"Variator target {target!r} holds {inner}, which another Variator adapter already wraps. All Variator "
            "adapters of a model must wrap the same FFN modules: pass `target_modules` naming those."
        )


def _refuse_offloaded(target: str, offloaded: list[str]) -> None:
    """Refuse a target that accelerate keeps offloaded: PEFT would create its plugin weights on the meta device."""
    for key in offloaded:
        if not key or target == key or target.startswith(key + ".") or key.startswith(target + "."):
            raise ValueError(
                f'{target!r} is offloaded by accelerate (a `device_map` with "cpu" or "disk" entries, or '
                "`cpu_offload`): plugin weights added there would be created on the meta device and lose their "
                "values. Load the model without offloading, attach the plugins (`get_peft_model`, `add_adapter`, "
                "`load_adapter`), then offload it: `accelerate.dispatch_model(model, device_map=..., "
                "offload_dir=...)`."
            )


def is_causal_lm(model: nn.Module) -> bool:
    """Whether `model` (a transformers model, not a PeftModel) is a causal LM: a class in transformers' own list
    (so GPT-2's `GPT2LMHeadModel` counts), or any `*ForCausalLM` (remote code, a subclass)."""
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _encoder_name(model: nn.Module) -> str | None:
    """The name of an encoder-decoder model's encoder module; None for other models."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    encoder = model.get_encoder()
    return next((name for name, module in model.named_modules() if module is encoder and name), None)


def _remove_variator_tags(model: nn.Module) -> None:
    tags = getattr(model, "model_tags", None)
    if not tags:
        return
    kept = [tag for tag in tags if tag != "variator" and not tag.startswith("variator-ratio-")]
    if kept:
        model.model_tags = kept
    else:
        model.__dict__.pop("model_tags", None)


def _as_list(value: int | list[int]) -> list[int]:
    return [value] if isinstance(value, int) else list(value)
