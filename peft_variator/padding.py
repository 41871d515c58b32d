"""The attention mask that tuner layers never see, made available to them.

PEFT tuner layers only receive the hidden states. Variator must know which tokens are padding, so the model's own
entry points (the top model, its inner base model, and the encoder that encoder-decoder `generate()` calls directly)
record the 2-D attention mask of each call: through a forward pre-hook, which sees every call through `module(...)`
whatever `forward` has become (accelerate's hooks replace it), and through a wrapper of `forward` set on the instance,
for callers that skip the hooks by calling `forward` directly (sentence-transformers). Layers read the mask from the
shared `PaddingContext`, which also memoises the group layout per ratio, so the layers of one forward share one plan.

Each entry point holds the context as an attribute, and the recorders look it up on the module they are called for,
never through a closure: `copy.deepcopy` and pickling copy them with the module, so a copied model's recorders find
the copy's own context, and unloading one model must not touch another.

The last mask stays recorded after the forward returns: gradient checkpointing re-runs layers during backward,
outside any model forward, and must see the same grouping.
"""

from __future__ import annotations

import functools
import inspect
import threading
from typing import Any

import torch
from torch import nn

from .plugin import GroupLayout, plan_groups

_CONTEXT_ATTRIBUTE = "_variator_padding"


class _Recorded:
    """One thread's recorded mask (and batch size) and the group layouts planned from it."""

    def __init__(self, mask: torch.Tensor | None = None, batch_size: int | None = None) -> None:
        self.mask = mask
        self.mask_version = _version_of(mask)
        # Layouts planned under inference mode are inference tensors, which autograd cannot save for backward.
        self.inference_mode = torch.is_inference_mode_enabled()
        self.batch_size = mask.shape[0] if mask is not None else batch_size
        self.layouts: dict[tuple[int, int, int, bool, torch.device], GroupLayout] = {}


class PaddingContext:
    """The padding mask of the model's current forward pass, shared by all Variator layers of one model.

    Kept per thread, so one model can serve forwards from several threads at once. A thread that never ran a forward
    itself (autograd's device threads recomputing checkpointed layers) sees the latest mask recorded by any thread.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._latest = _Recorded()
        # Set by VariatorTrainer while it distills a causal LM: so many of each sequence's last tokens run exact, as
        # the last prompt token and the generated tokens do at inference. For every thread (checkpointed layers are
        # recomputed on autograd's), and only where the adapter keeps the last token exact.
        self.decode_tokens = 0

    def __deepcopy__(self, memo: dict) -> PaddingContext:
        # Recorded masks belong to the original's forwards; a copied model (its entry points and layers, through
        # `memo`) shares one fresh context.
        return type(self)()

    def __reduce__(self) -> tuple:
        # Likewise for pickling (`torch.save(model)`); thread-local storage cannot be pickled anyway.
        return type(self), ()

    def record(self, attention_mask: torch.Tensor | None, batch_size: int | None = None) -> None:
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                "Variator needs a 2-D padding mask `attention_mask` of shape (batch, seq_len) to group real tokens, "
                f"got a {attention_mask.dim()}-D tensor of shape {tuple(attention_mask.shape)}. `generate()` builds "
                'such masks itself for a static KV cache (`cache_implementation="static"`): generate with the '
                "default dynamic cache."
            )
        current = getattr(self._local, "recorded", None)
        # Nested entry points (a PeftModel, then its base model) record the same call twice: the same mask, not
        # written to since (its version counter), or no mask at all. Keep the first record and the layouts already
        # planned from it, unless the second knows the batch size the first did not.
        nested = current is not None and current.inference_mode == torch.is_inference_mode_enabled()
        if nested and current.mask is attention_mask:
            if attention_mask is None:
                if batch_size is None or batch_size == current.batch_size:
                    return
            elif current.mask_version is not None and _version_of(attention_mask) == current.mask_version:
                return
        self._local.recorded = self._latest = _Recorded(attention_mask, batch_size)

    def layout(
        self, batch_size: int, seq_len: int, ratio: int, exact_last_token: bool, device: torch.device
    ) -> GroupLayout:
        """The group layout of hidden states `(batch_size, seq_len, H)` on `device` for `ratio`, memoised per forward.

        Per device, because a model split over several GPUs (`device_map="auto"`) runs its layers on different ones.
        """
        recorded = getattr(self._local, "recorded", None) or self._latest
        exact_tail = max(1, self.decode_tokens) if exact_last_token else 0
        key = (batch_size, seq_len, ratio, exact_tail, device)
        layout = recorded.layouts.get(key)
        if layout is None:
            mask = self._mask_for(recorded.mask, batch_size, seq_len)
            if mask is not None:
                mask = mask.to(device)
            elif exact_tail:
                mask = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
            layout = plan_groups(seq_len, ratio, mask, exact_tail, device)
            recorded.layouts[key] = layout
        return layout

    def sequence_shape(self, num_tokens: int) -> tuple[int, int]:
        """`(batch, seq_len)` of hidden states that arrive flattened to `(num_tokens, H)`, as OPT's FFN gets them."""
        recorded = getattr(self._local, "recorded", None) or self._latest
        batch = recorded.batch_size
        if batch is None or num_tokens % batch != 0:
            raise ValueError(
                f"A Variator layer received {num_tokens} flattened token vectors, which cannot be split into the "
                f"sequences of this batch (batch size {batch}). Call the model (not an inner layer) with "
                "`input_ids` or `inputs_embeds` and, with padding, an `attention_mask`."
            )
        return batch, num_tokens // batch

    @staticmethod
    def _mask_for(mask: torch.Tensor | None, batch_size: int, seq_len: int) -> torch.Tensor | None:
        if mask is None:
            return None
        if mask.shape[0] != batch_size or mask.shape[1] < seq_len:
            raise ValueError(
                f"The recorded attention_mask has shape {tuple(mask.shape)} but a Variator layer received hidden "
                f"states for batch {batch_size} x {seq_len} tokens. Call the model (not an inner layer) with the "
                "attention_mask of this batch."
            )
        # With a KV cache the mask also covers earlier tokens; the hidden states are the newest ones.
        return mask[:, mask.shape[1] - seq_len :]


def _version_of(mask: torch.Tensor | None) -> int | None:
    """The mask's version counter, which every in-place write bumps, so a caller that refills one mask buffer between
    calls is not taken for a nested entry point of the same call. None where unknown: inference-mode tensors keep
    no counter."""
    if mask is None or mask.is_inference():
        return None
    return mask._version


def padding_context(model: nn.Module) -> PaddingContext:
    """The model's padding context, attaching it and its mask recorders on first use."""
    context = getattr(model, _CONTEXT_ATTRIBUTE, None)
    if context is None:
        context = PaddingContext()
        object.__setattr__(model, _CONTEXT_ATTRIBUTE, context)
        for entry_point in _entry_points(model):
            object.__setattr__(entry_point, _CONTEXT_ATTRIBUTE, context)
            entry_point.register_forward_pre_hook(_record, with_kwargs=True)
            object.__setattr__(entry_point, "forward", _MaskRecordingForward(entry_point))
    return context


def detach_padding_context(model: nn.Module) -> None:
    """Remove the recorders and the context, leaving the model as it was before Variator touched it."""
    for module in {id(m): m for m in (model, *_entry_points(model))}.values():
        # Removed by key, as `RemovableHandle.remove` does: a deep copy's hooks have no handle of their own.
        for hook_id, hook in list(module._forward_pre_hooks.items()):
            if hook is _record:
                del module._forward_pre_hooks[hook_id]
                module._forward_pre_hooks_with_kwargs.pop(hook_id, None)
        wrapper = vars(module).get("forward")
        if isinstance(wrapper, _MaskRecordingForward):
            if wrapper.inner is None:
                object.__delattr__(module, "forward")
            else:
                object.__setattr__(module, "forward", wrapper.inner)
        if _CONTEXT_ATTRIBUTE in vars(module):
            object.__delattr__(module, _CONTEXT_ATTRIBUTE)


def _entry_points(model: nn.Module) -> list[nn.Module]:
    candidates = [model, getattr(model, "base_model", None)]
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        candidates.append(model.get_encoder())
    entry_points: list[nn.Module] = []
    for module in candidates:
        if isinstance(module, nn.Module) and all(module is not seen for seen in entry_points):
            if "attention_mask" in inspect.signature(module.forward).parameters:
                entry_points.append(module)
    return entry_points


@torch.compiler.disable
def _record(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Record the padding mask (and batch size) of a call of entry point `module` with `args` / `kwargs`.

    The forward pre-hook of each entry point: it sees every call through `module(...)`, whatever `forward` is by then
    (accelerate's hooks replace it), on the module actually called (a copy, a replica). Outside `torch.compile`'s
    tracing: it only reads the call's arguments and writes the context, and inside a graph each of its checks would
    be a guard or a break.
    """
    context = getattr(module, _CONTEXT_ATTRIBUTE, None)
    if context is None:
        return
    positions = _argument_positions(type(module))

    def argument(name: str) -> Any:
        if name in kwargs:
            return kwargs[name]
        position = positions.get(name)
        return args[position] if position is not None and position < len(args) else None

    # The batch size lets layers regroup tokens that an architecture flattens before its FFN (OPT).
    batch_size = None
    for name in ("input_ids", "inputs_embeds"):
        value = argument(name)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            batch_size = value.shape[0]
            break
    context.record(argument("attention_mask"), batch_size)


@functools.cache
def _argument_positions(module_class: type) -> dict[str, int]:
    parameters = list(inspect.signature(module_class.forward).parameters)[1:]  # after `self`
    return {name: index for index, name in enumerate(parameters)}


class _MaskRecordingForward:
    """An entry point's `forward`, set on the instance, for callers that skip `__call__` and so the pre-hook:
    sentence-transformers calls `forward` directly. Records the call's mask, then runs the forward (a second record
    of the same call, after the pre-hook's, is recognised as such).

    Holds its module (not a bound method) so deep copies and pickles of the model rebuild it around the copy. Wraps
    an instance-level `forward` already in place (accelerate's device-map hooks) and puts it back on detach.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.inner = vars(module).get("forward")
        # Callers read the forward's parameters (transformers' `generate`, the Trainer's column filter).
        self.__signature__ = inspect.signature(module.forward)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args and args[0] is self.module:
            # Rebound as a method (accelerate's `unwrap_model` does `MethodType(forward, model)`).
            args = args[1:]
        _record(self.module, args, kwargs)
        if self.inner is not None:
            return self.inner(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)
