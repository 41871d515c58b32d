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
outside any model forward, and must see the same grouping and the same adapter. Several calls may run before one
backward (the two towers of a contrastive loss; `VariatorTrainer`'s students, one adapter each), so the model's
checkpointing function is wrapped to run each checkpointed block, in its forward and in its recompute, as part of the
call it belongs to (`_ReplayingCheckpoint`). Where a model checkpoints by other means, each layer recognises the call
it is recomputing by its input (`call_of`).
"""

from __future__ import annotations

import functools
import inspect
import threading
import weakref
from collections import deque
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from .plugin import GroupLayout, plan_groups, plan_packed_groups

_CONTEXT_ATTRIBUTE = "_variator_padding"
# Where transformers puts the function its checkpointed layers run through (`_set_gradient_checkpointing`).
_CHECKPOINT_FUNCTION = "_gradient_checkpointing_func"
# Training forwards remembered per layer for gradient checkpointing's recompute: more than the calls a contrastive
# or preference loss runs before its backward.
_REMEMBERED_CALLS = 16


class _Recorded:
    """One thread's recorded call of the model and the group layouts planned from it.

    Attributes:
        mask: the 2-D padding mask, None when the call had none.
        sequence_index: `(B or 1, N)`, which sequence of its row each token belongs to, for a padding-free batch
            (several sequences packed into each row, told apart by `position_ids` only); None otherwise.
        batch_size: sequences in the call, None when unknown.
        continues_cache: the call was given a KV cache, so its mask may also cover tokens of earlier calls.
        logits_kept: how many of each sequence's last positions the caller reads logits of (`logits_to_keep`, which
            `generate()` sets: 1 per step, and the candidates + 1 in assisted or prompt-lookup decoding); 0 for all
            or unknown.
        checkpointing: the model ran in training mode, with gradients and gradient checkpointing on, so backward may
            recompute its layers after other calls were recorded (`PaddingContext.call_of`).
        depth: how many entry points' calls were running when this call was recorded (0 for the outermost).
        outer: the record this one replaced while nested in a running call, restored when this call returns (a
            vision tower's record gives way to the text's again).
        plugins: per layer, the adapter whose plugin it ran in this call (None: none), noted while checkpointing so
            the recompute runs the same one (`PaddingContext.plugin_of`).
    """

    def __init__(
        self,
        mask: torch.Tensor | None = None,
        batch_size: int | None = None,
        continues_cache: bool = False,
        logits_kept: int = 0,
        sequence_index: torch.Tensor | None = None,
        checkpointing: bool = False,
        depth: int = 0,
        outer: _Recorded | None = None,
    ) -> None:
        self.mask = mask
        self.sequence_index = sequence_index
        self.checkpointing = checkpointing
        self.depth = depth
        self.outer = outer
        self.mask_version = _version_of(mask)
        # Layouts planned under inference mode are inference tensors, which autograd cannot save for backward.
        self.inference_mode = torch.is_inference_mode_enabled()
        self.batch_size = mask.shape[0] if mask is not None else batch_size
        self.continues_cache = continues_cache
        self.logits_kept = logits_kept
        self.layouts: dict[tuple[int, int, int, int, torch.device], GroupLayout] = {}
        self.plugins: dict[nn.Module, str | None] = {}


class PaddingContext:
    """The padding mask of the model's current forward pass, shared by all Variator layers of one model.

    Kept per thread, so one model can serve forwards from several threads at once. A thread that never ran a forward
    itself (autograd's device threads recomputing checkpointed layers) sees the latest mask recorded by any thread.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._latest = _Recorded()
        # Per layer, its latest forwards in training calls with checkpointing on (`call_of`).
        self._training_calls: weakref.WeakKeyDictionary[nn.Module, deque] = weakref.WeakKeyDictionary()
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

    def record(
        self,
        attention_mask: torch.Tensor | None,
        batch_size: int | None = None,
        continues_cache: bool = False,
        logits_kept: int = 0,
        sequence_index: torch.Tensor | None = None,
        takes_mask: bool = True,
        checkpointing: bool = False,
        seq_len: int | None = None,
    ) -> None:
        """Record a call of an entry point on `seq_len` tokens per sequence (from its `input_ids` or
        `inputs_embeds`; None without either); `takes_mask` is False for one whose forward has no `attention_mask` (a
        vision tower), which never takes over the mask of the call it runs in, and neither does one called without a
        mask on tokens of its own (no token ids or embeddings, as BLIP-2's Q-former takes query embeddings) or of
        another length."""
        current = getattr(self._local, "recorded", None)
        depth = self._calls_running()
        nested = current is not None and depth > 0 and current.inference_mode == torch.is_inference_mode_enabled()
        built_from_outer_mask = attention_mask is not None and not _has_dims(attention_mask, 2)
        if built_from_outer_mask:
            if not nested:
                raise ValueError(
                    "Variator needs a 2-D padding mask `attention_mask` of shape (batch, seq_len) to group real "
                    f"tokens, got {_described(attention_mask)}. `generate()` builds such masks itself for a static KV "
                    'cache (`cache_implementation="static"`): generate with the default dynamic cache.'
                )
            # The masks a model builds from the call's own for an inner model (4-D, or one per attention type, as
            # Gemma 3 and PaliGemma hand their language model): the running call's 2-D mask stands.
            attention_mask = None
        # Nested entry points (a causal LM, then its inner base model) record the same call again, while the first is
        # still running (`_calls_running`, counted by `enter` / `leave` around each entry point's forward, after its
        # records); a call after the last one returned is new, whatever its mask. The inner record keeps what only
        # the head was given (the logits to keep, the cache) and takes the inner mask where the head passed on a
        # different one. A tower of a model with several (CLIP's text and vision models, a vision-language model's
        # vision tower) records its own call, and the call it ran in gets its record back when it returns.
        if nested:
            checkpointing = checkpointing or current.checkpointing
        own_sequence = (
            attention_mask is None
            and not built_from_outer_mask
            and current is not None
            and current.mask is not None
            and not current.continues_cache
            and (seq_len is None or seq_len != current.mask.shape[1])
        )
        if nested and takes_mask and not own_sequence:
            continues_cache = continues_cache or current.continues_cache
            logits_kept = logits_kept or current.logits_kept
            sequence_index = current.sequence_index if sequence_index is None else sequence_index
            if attention_mask is None or (
                attention_mask is current.mask
                and (current.mask_version is None or _version_of(attention_mask) == current.mask_version)
            ):
                attention_mask = current.mask
                if batch_size is None or batch_size == current.batch_size:
                    # The same call; checkpointing may only show at this level (a user's module around the model).
                    current.checkpointing = checkpointing
                    return
        outer = None
        if nested:
            # The pre-hook and the forward wrapper both record a call: the second replaces the first, not its outer.
            outer = current.outer if current.depth == depth else current
        self._local.recorded = self._latest = _Recorded(
            attention_mask, batch_size, continues_cache, logits_kept, sequence_index, checkpointing, depth, outer
        )

    def enter(self) -> None:
        """An entry point's forward begins (after its call was recorded)."""
        self._local.calls_running = self._calls_running() + 1

    def leave(self) -> None:
        """An entry point's call ended, returned or raised. A nested call's record gives way to the one it replaced;
        the outermost call's record stays, for checkpointed layers' recompute."""
        depth = max(self._calls_running() - 1, 0)
        self._local.calls_running = depth
        current = getattr(self._local, "recorded", None)
        if current is not None and current.depth == depth and current.outer is not None:
            self._local.recorded = self._latest = current.outer

    def _calls_running(self) -> int:
        return getattr(self._local, "calls_running", 0)

    def current_call(self) -> _Recorded:
        """The call running in this thread (the latest one recorded by any thread where this one recorded none)."""
        return getattr(self._local, "replaying", None) or getattr(self._local, "recorded", None) or self._latest

    @torch.compiler.disable
    def _replay(self, call: _Recorded | None) -> _Recorded | None:
        """Make `call` the one this thread's layers run in (None: back to the recorded calls); returns the previous
        one. Outside `torch.compile`'s tracing, which would defer the thread-local write past a graph break."""
        previous = getattr(self._local, "replaying", None)
        self._local.replaying = call
        return previous

    @torch.compiler.disable
    def plugin_of(self, layer: nn.Module, active: str | None) -> str | None:
        """The adapter whose plugin `layer` runs (None: none): `active`, the one active now, except when gradient
        checkpointing recomputes the layer during backward, which runs the one its forward ran, whatever was activated
        since (`VariatorTrainer`'s students each run another adapter before one backward of their summed losses).
        Known inside blocks run through `_ReplayingCheckpoint`, which the forward notes and the recompute reads; other
        checkpointing is checked by `call_of`."""
        replaying = getattr(self._local, "replaying", None)
        if replaying is None:
            return active
        if not _in_backward():
            replaying.plugins[layer] = active
            return active
        return replaying.plugins.get(layer, active)

    @torch.compiler.disable
    def call_of(self, layer: nn.Module, hidden: torch.Tensor, adapter: str | None = None) -> _Recorded:
        """The recorded call that `layer`'s forward on `hidden` (running `adapter`) belongs to: the latest one, except
        when gradient checkpointing recomputes the layer during backward after other calls were recorded (a
        contrastive loss runs the model on anchors, then on positives, then backpropagates both).

        Inside a block checkpointed through transformers' checkpointing function, that is the call the block ran in
        (`_ReplayingCheckpoint`). Models that checkpoint by other means (a few call `torch.utils.checkpoint` directly)
        are recognised by input: a recompute sees the same input as the forward it repeats, so each training forward
        notes its input's shape and a fingerprint of its values, and the recompute takes the call whose input matches.
        Noted only for calls of a model in training mode with gradients and checkpointing on (`_Recorded`), whatever
        autograd's state inside the layer (reentrant checkpointing runs the original forward without gradients), and
        never under inference mode, whose calls no backward can reach; forwards that ran no plugin too, so that their
        recompute runs none either. A recompute that cannot tell whether its forward ran the adapter active now raises
        instead of guessing."""
        replaying = getattr(self._local, "replaying", None)
        if replaying is not None:
            return replaying
        current = getattr(self._local, "recorded", None) or self._latest
        if not layer.training or torch.is_inference_mode_enabled():
            return current
        if not _in_backward():
            if current.checkpointing:
                noted = self._training_calls.setdefault(layer, deque(maxlen=_REMEMBERED_CALLS))
                noted.append(_NotedForward(hidden.shape, _fingerprint(hidden), current, adapter))
            return current
        noted = self._training_calls.get(layer)
        if not noted:
            return current
        fingerprint = _fingerprint(hidden)
        # Recomputed on the same device from the same inputs: the forward's values, up to rounding at most.
        tolerance = 1e-3 * (float(fingerprint.abs().max()) + 1e-6)
        matches = [
            (distance, forward)
            for forward in reversed(noted)
            if forward.shape == hidden.shape
            and (distance := float((forward.fingerprint - fingerprint).abs().max())) <= tolerance
        ]
        # Each forward is recomputed once per backward: those already recomputed (by an earlier backward, whose graph
        # is gone) only count for a second backward of the same graph (`retain_graph=True`).
        pending = [match for match in matches if not match[1].recomputed] or matches
        if not pending:
            raise RuntimeError(
                "Gradient checkpointing recomputed a Variator layer whose forward is not among the last "
                f"{_REMEMBERED_CALLS} calls of the model in training mode, so its grouping is unknown. Run backward "
                f"after at most {_REMEMBERED_CALLS} forwards, or turn gradient checkpointing off."
            )
        # The layer runs the adapter active now (or none): wrong if the forward it repeats may have run another one.
        ran = {forward.adapter for _, forward in pending}
        if ran != {adapter}:
            raise RuntimeError(
                f"Gradient checkpointing recomputed a Variator layer whose forward ran {_adapters(ran)}, but it would "
                f"now run {_adapters({adapter})}: this model checkpoints its layers by other means than the function "
                "that transformers' `gradient_checkpointing_enable()` gives them, so the recompute cannot switch "
                "back. Run backward before switching or disabling adapters, or turn gradient checkpointing off."
            )
        # Of equal ones (the same batch run twice), the latest.
        forward = min(pending, key=lambda match: match[0])[1]
        forward.recomputed = True
        return forward.call

    def layout(
        self,
        batch_size: int,
        seq_len: int,
        ratio: int,
        exact_last_token: bool,
        device: torch.device,
        recorded: _Recorded | None = None,
    ) -> GroupLayout:
        """The group layout of hidden states `(batch_size, seq_len, H)` on `device` for `ratio`, memoised per forward,
        for the `recorded` call (`call_of`; by default the latest).

        Per device, because a model split over several GPUs (`device_map="auto"`) runs its layers on different ones.
        """
        recorded = recorded or getattr(self._local, "recorded", None) or self._latest
        if recorded.batch_size is not None and recorded.batch_size != batch_size:
            raise ValueError(
                f"A Variator layer received hidden states for {batch_size} sequences of {seq_len} tokens, but the "
                f"model's last call had {recorded.batch_size} sequences. Layers must run inside a call of the model "
                "itself (not called directly, nor recomputed by gradient checkpointing after another call), on "
                "(batch, seq_len, hidden) in the call's batch order: architectures that run their layers "
                "sequence-first (XLNet, FSMT) are not supported."
            )
        # Every position whose logits the caller reads runs exact, as the last prompt token does.
        exact_tail = max(1, self.decode_tokens, recorded.logits_kept) if exact_last_token else 0
        key = (batch_size, seq_len, ratio, exact_tail, device)
        layout = recorded.layouts.get(key)
        if layout is None:
            if recorded.sequence_index is not None:
                sequence_index = self._sequence_index_for(recorded, batch_size, seq_len).to(device)
                layout = plan_packed_groups(sequence_index, ratio, exact_tail)
            else:
                mask = self._mask_for(recorded, batch_size, seq_len)
                if mask is not None:
                    mask = mask.to(device)
                elif exact_tail:
                    mask = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
                layout = plan_groups(seq_len, ratio, mask, exact_tail, device)
            recorded.layouts[key] = layout
        return layout

    def sequence_shape(self, num_tokens: int, recorded: _Recorded | None = None) -> tuple[int, int]:
        """`(batch, seq_len)` of hidden states that arrive flattened to `(num_tokens, H)`, as OPT's FFN gets them, in
        the `recorded` call (by default the latest)."""
        recorded = recorded or getattr(self._local, "recorded", None) or self._latest
        batch = recorded.batch_size
        mask = recorded.mask
        if mask is not None and not recorded.continues_cache and num_tokens != mask.numel():
            # Without a cache the call's mask covers exactly its tokens; fewer (or more) are not its sequences.
            raise ValueError(
                f"A Variator layer received {num_tokens} flattened token vectors, but the model was called with "
                f"{mask.shape[0]} x {mask.shape[1]} tokens: the module sees a subset of the tokens, as an expert of a "
                "mixture of experts does (the tokens routed to it, from every sequence). Target the block that holds "
                "the experts and their router, or the layer's dense FFN."
            )
        if batch is None or num_tokens % batch != 0:
            raise ValueError(
                f"A Variator layer received {num_tokens} flattened token vectors, which cannot be split into the "
                f"sequences of this batch (batch size {batch}). Call the model (not an inner layer) with "
                "`input_ids` or `inputs_embeds` and, with padding, an `attention_mask`."
            )
        return batch, num_tokens // batch

    @staticmethod
    def _sequence_index_for(recorded: _Recorded, batch_size: int, seq_len: int) -> torch.Tensor:
        sequence_index = recorded.sequence_index
        if sequence_index.shape[1] != seq_len:
            raise ValueError(
                f"A Variator layer received {seq_len} tokens per sequence, but the model was called with "
                f"`position_ids` for {sequence_index.shape[1]} tokens that pack several sequences into each row: the "
                "architecture changes the sequence length before this layer, so the layer cannot tell the packed "
                "sequences apart. Run padded batches (an `attention_mask`) instead."
            )
        return sequence_index.expand(batch_size, -1)

    @staticmethod
    def _mask_for(recorded: _Recorded, batch_size: int, seq_len: int) -> torch.Tensor | None:
        mask = recorded.mask
        if mask is None:
            return None
        if mask.shape[1] < seq_len:
            raise ValueError(
                f"The recorded attention_mask has shape {tuple(mask.shape)} but a Variator layer received hidden "
                f"states for batch {batch_size} x {seq_len} tokens. Call the model (not an inner layer) with the "
                "attention_mask of this batch. If the model lengthens the sequence itself: where it pads it to a "
                "multiple (Longformer, of `config.attention_window`), pad the input to that length first "
                "(`tokenizer(..., padding=True, pad_to_multiple_of=...)`); where it adds tokens of its own (CPM-Ant's "
                "prompt tokens, ProphetNet's n-gram streams), its layers cannot be grouped by the mask and the "
                "architecture is not supported."
            )
        if mask.shape[1] > seq_len and not recorded.continues_cache:
            raise ValueError(
                f"A Variator layer received {seq_len} tokens per sequence, but the model was called with "
                f"{mask.shape[1]} and no KV cache: the architecture shortens the sequence before this layer (Funnel's "
                "pooling; a speech model whose mask counts audio samples), so the layer cannot tell which of its "
                "tokens are padding. Call the model without an `attention_mask` (unpadded batches), or target only "
                "layers that see the whole sequence (`layers_to_transform`)."
            )
        # With a KV cache the mask also covers earlier tokens; the hidden states are the newest ones.
        return mask[:, mask.shape[1] - seq_len :]


class _NotedForward:
    """A layer's forward in a checkpointing model's training call, for its recompute to be recognised by input."""

    def __init__(self, shape: torch.Size, fingerprint: torch.Tensor, call: _Recorded, adapter: str | None) -> None:
        self.shape = shape
        self.fingerprint = fingerprint
        self.call = call
        self.adapter = adapter
        self.recomputed = False


def _adapters(names: set[str | None]) -> str:
    described = [f"adapter {name!r}" for name in sorted(name for name in names if name is not None)]
    return " or ".join(described + (["no adapter"] if None in names else []))


def _in_backward() -> bool:
    """Whether this thread runs inside a backward pass, as checkpointed layers' recompute does."""
    return torch._C._current_graph_task_id() != -1


class _ReplayingCheckpoint:
    """A model's gradient checkpointing function (`_gradient_checkpointing_func`, which transformers' layers call with
    their forward), wrapped so the block runs as part of the call it was checkpointed in: in its forward, and again in
    its recompute during backward, after other calls may have run, with other masks or adapters.

    Holds the context as an attribute (not in a closure) so deep copies and pickles of the model rebuild it around the
    copy's own context.
    """

    def __init__(self, checkpoint: Any, context: PaddingContext) -> None:
        self.checkpoint = checkpoint
        self.context = context

    def __call__(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        call = self.context.current_call()
        context = self.context

        def run_in_call(*inner_args: Any, **inner_kwargs: Any) -> Any:
            previous = context._replay(call)
            try:
                return function(*inner_args, **inner_kwargs)
            finally:
                context._replay(previous)

        return self.checkpoint(run_in_call, *args, **kwargs)


def _replay_checkpoints(model: nn.Module, context: PaddingContext) -> None:
    """Wrap the checkpointing functions of `model` (`gradient_checkpointing_enable()` sets new ones each time)."""
    for module in model.modules():
        function = vars(module).get(_CHECKPOINT_FUNCTION)
        if function is not None and not isinstance(function, _ReplayingCheckpoint):
            object.__setattr__(module, _CHECKPOINT_FUNCTION, _ReplayingCheckpoint(function, context))


def _fingerprint(hidden: torch.Tensor) -> torch.Tensor:
    """One number per token vector of `hidden` that tells inputs apart: a projection on a fixed direction (not the
    plain sum, which is zero for every input right after a LayerNorm), in the input's dtype, kept as float32."""
    direction = torch.linspace(-1.0, 1.0, hidden.shape[-1], device=hidden.device, dtype=hidden.dtype)
    return (hidden.detach().reshape(-1, hidden.shape[-1]) @ direction).float()


def is_checkpointing(model: nn.Module) -> bool:
    """A model's checkpointing flag: transformers 5 renamed it (the old name warns), and earlier 5.x releases have only
    the old one."""
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if flag is None else flag)


def _described(mask: Any) -> str:
    if isinstance(mask, torch.Tensor):
        return f"a {mask.dim()}-D tensor of shape {tuple(mask.shape)}"
    return f"a {type(mask).__name__}"


def packed_sequences(position_ids: Any) -> torch.Tensor | None:
    """Which sequence of its row each token belongs to, `(B, N)`, when `position_ids` pack several sequences into a
    row (a padding-free batch, e.g. from `DataCollatorWithFlattening`); None when no row holds more than one.

    transformers' rule (`masking_utils.find_packed_sequence_indices`), which its attention follows when a call has no
    `attention_mask` and no cache: a new sequence starts wherever the position does not go up by exactly one.
    """
    if not _has_dims(position_ids, 2) or position_ids.shape[1] < 2 or position_ids.is_floating_point():
        return None
    starts = position_ids.diff(dim=1) != 1
    if not bool(starts.any()):
        return None
    return F.pad(starts.long().cumsum(dim=1), (1, 0))


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
    for module in model.modules():
        function = vars(module).get(_CHECKPOINT_FUNCTION)
        if isinstance(function, _ReplayingCheckpoint):
            object.__setattr__(module, _CHECKPOINT_FUNCTION, function.checkpoint)


def _entry_points(model: nn.Module) -> list[nn.Module]:
    """The modules whose calls are recorded: the model, its inner base model, the encoder that encoder-decoder
    `generate()` calls directly, and every model inside it (CLIP's text and vision models, a vision-language model's
    vision tower and language model, which `get_text_features` / `get_image_features` call directly) whose forward
    takes an `attention_mask`, `pixel_values` or (Qwen2-VL's vision tower) `grid_thw`."""
    candidates = [model, getattr(model, "base_model", None)]
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        candidates.append(model.get_encoder())
    candidates += [module for module in model.modules() if isinstance(module, PreTrainedModel)]
    entry_points: list[nn.Module] = []
    for module in candidates:
        if isinstance(module, nn.Module) and all(module is not seen for seen in entry_points):
            parameters = inspect.signature(module.forward).parameters
            if {"attention_mask", "pixel_values", "grid_thw"} & set(parameters):
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
    if getattr(module, "_is_replica", False):
        # A replica shares the original's `__dict__`, so its `forward` would be the original's recorder, which runs
        # the original module (on the first device) instead of the replica.
        raise RuntimeError(
            "Variator models cannot run under torch.nn.DataParallel: its replicas would run the original model "
            "instead of themselves. Use DistributedDataParallel (`torchrun` or `accelerate launch`); a Trainer "
            "started with plain `python` on a machine with several GPUs wraps the model in DataParallel, so launch "
            "it with `torchrun --nproc_per_node=<gpus>` or limit it to one GPU (CUDA_VISIBLE_DEVICES)."
        )
    positions = _argument_positions(type(module))

    def argument(name: str) -> Any:
        if name in kwargs:
            return kwargs[name]
        position = positions.get(name)
        return args[position] if position is not None and position < len(args) else None

    # The batch size lets layers regroup tokens that an architecture flattens before its FFN (OPT). Only from
    # (batch, seq_len) ids or (batch, seq_len, hidden) embeddings: multiple-choice models fold more into the batch.
    batch_size = seq_len = None
    attention_mask = argument("attention_mask")
    for name, dims in (("input_ids", 2), ("inputs_embeds", 3)):
        value = argument(name)
        if _has_dims(value, dims):
            batch_size, seq_len = value.shape[:2]
            break
        if _has_dims(value, dims + 1) and _has_dims(attention_mask, 3):
            # A multiple-choice model's (batch, choices, seq_len) inputs: it folds the choices into the batch itself.
            attention_mask = attention_mask.reshape(-1, attention_mask.shape[-1])
            break
    continues_cache = any(argument(name) is not None for name in _CACHE_ARGUMENTS)
    # A padding-free batch tells its sequences apart by `position_ids` alone, as transformers' attention does.
    sequence_index = None
    if attention_mask is None and not continues_cache and context._calls_running() == 0:
        # Only for the outermost call: nested ones take it over.
        sequence_index = packed_sequences(argument("position_ids"))
    logits_kept = argument("logits_to_keep")
    if not isinstance(logits_kept, int) or isinstance(logits_kept, bool) or logits_kept < 0:
        # A tensor of positions (or nothing): logits anywhere, as in training, where every token is compressed.
        logits_kept = 0
    grid_thw = argument("grid_thw")
    if attention_mask is None and _has_dims(grid_thw, 2) and grid_thw.shape[1] == 3:
        # A vision tower that takes every image's patches as one flattened sequence, `(patches, ...)`, and the
        # `(frames, height, width)` patch grid of each image or video (Qwen2-VL): each frame is a sequence of its own,
        # as it is to the tower's attention.
        frame_patches = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
        frames = torch.arange(len(frame_patches), device=grid_thw.device)
        sequence_index, batch_size = torch.repeat_interleave(frames, frame_patches)[None], 1
    takes_mask = "attention_mask" in positions
    # In training only, and not again inside a call already checkpointing: the flag walks the model's modules. Nested
    # models are asked too, as the outermost module may be a user's own, holding the transformers model.
    running = context._calls_running() > 0 and getattr(context._local, "recorded", None)
    # A call without gradients (a teacher's, an evaluation's) is never recomputed: reentrant checkpointing turns them
    # off only inside the checkpointed blocks, after this record.
    checkpointing = (
        module.training
        and torch.is_grad_enabled()
        and not (running and running.checkpointing)
        and is_checkpointing(module)
    )
    if checkpointing:
        _replay_checkpoints(module, context)
    context.record(
        attention_mask, batch_size, continues_cache, logits_kept, sequence_index, takes_mask, checkpointing, seq_len
    )


def _has_dims(value: Any, dims: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == dims


# How entry points of transformers' models are handed a KV cache, old and new (5.24 renamed `past_key_values` to
# `cache`, and still takes the old name until 5.40).
_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "past", "mems")


@functools.cache
def _argument_positions(module_class: type) -> dict[str, int]:
    parameters = list(inspect.signature(module_class.forward).parameters)[1:]  # after `self`
    return {name: index for index, name in enumerate(parameters)}


class _MaskRecordingForward:
    """An entry point's `forward`, set on the instance, for callers that skip `__call__` and so the pre-hook:
    sentence-transformers calls `forward` directly. Records the call's mask, then runs the forward, counted as a call
    in flight. Called through `module(...)`, the call is recorded twice, by the pre-hook and here, both before it
    counts: the second record replaces the first with the same content, before any layer has planned from it.

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
        context = getattr(self.module, _CONTEXT_ATTRIBUTE, None)
        if context is None:
            return self._forward(*args, **kwargs)
        # Counted here, where `finally` also sees a KeyboardInterrupt (a forward hook would not): every call through
        # `module(...)` ends here too, accelerate's replacement `forward` included, as it calls the one it replaced.
        context.enter()
        try:
            return self._forward(*args, **kwargs)
        finally:
            context.leave()

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.inner is not None:
            return self.inner(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)
