"""Tuner layers that put a Variator plugin around a feed-forward network (FFN).

Most architectures have their FFN in one module (`mlp`, `ffn`, `DenseReluDense`): `VariatorFFN` wraps it whole.
BERT-style encoders split it: `intermediate` (hidden -> intermediate) and `output.dense` (intermediate -> hidden,
followed inside `output` by dropout, the residual and LayerNorm). There `VariatorFFNInput` compresses before the
first half and `VariatorFFNOutput` decompresses after the second, so the residual and norm stay the base model's.
The two halves pass the group layout and the uncompressed FFN input through a `SplitFFNState` that both hold as a
plain attribute, never as a submodule, so PEFT saves each plugin weight exactly once.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .architectures import ffn_hidden_size, linear_shapes, routed_experts_hidden_size
from .config import VariatorConfig
from .padding import PaddingContext
from .plugin import DecompressionAdapter, GroupLayout, compress, decompress, init_score, repeat_groups

try:  # where transformers collects the outputs a call asks for (router logits), from 5.x on
    from transformers.utils.output_capturing import _active_collector as _OUTPUT_COLLECTOR
except ImportError:  # pragma: no cover - an older or newer layout: router logits stay per compressed vector
    _OUTPUT_COLLECTOR = None

# The decompression adapter's three linear maps, in `DecompressionAdapter` field order.
DECOMPRESSOR_NAMES = ("variator_down_output", "variator_down_token", "variator_up")


def check_one_adapter(adapter_names: str | list[str]) -> list[str]:
    """`adapter_names` as a list, refused when it activates more than one adapter (none is allowed: PEFT activates
    none while a model has no adapter left)."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    if len(names) > 1:
        raise ValueError(
            f"Variator runs exactly one adapter at a time; got {names}. Pass a single adapter name, or use "
            "`disable_adapter()` to run the base model."
        )
    return names


class VariatorLayer(nn.Module, BaseTunerLayer):
    """Common part of the Variator tuner layers: per-adapter ratios, the active plugin, no merging."""

    other_param_names = ("ratio", "exact_last_token")

    def __init__(self, base_layer: nn.Module, padding: PaddingContext, hidden_size: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.padding = padding
        self.hidden_size = hidden_size
        self.ratio: dict[str, int] = {}
        self.exact_last_token: dict[str, bool] = {}
        self._disable_adapters = False
        self.merged_adapters = []

    def update_layer(self, adapter_name: str, config: VariatorConfig) -> None:
        self.ratio[adapter_name] = config.ratio
        self.exact_last_token[adapter_name] = bool(config.exact_last_token)
        self._add_plugin(adapter_name, config)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _add_plugin(self, adapter_name: str, config: VariatorConfig) -> None:
        raise NotImplementedError

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        # transformers' own PEFT integration (`PreTrainedModel.set_adapter`) calls each layer directly.
        super().set_adapter(check_one_adapter(adapter_names), inference_mode=inference_mode)

    def _get_base_layer_device_and_dtype(
        self, base_layer: nn.Module
    ) -> tuple[torch.device | None, torch.dtype | None]:
        # PEFT reads the base layer's `.weight`. A whole FFN block (and BERT's `intermediate`) has none, and PEFT then
        # moves nothing: an adapter added to a model on a GPU would stay on the CPU, and one added to a bfloat16 model
        # would stay float32 even with `autocast_adapter_dtype=False`. The FFN's own parameters say where it runs.
        device, dtype = super()._get_base_layer_device_and_dtype(base_layer)
        if device is not None:
            return device, dtype
        floating = next((p for p in base_layer.parameters() if p.is_floating_point()), None)
        if floating is not None:
            return floating.device, floating.dtype
        # A quantized FFN (integer weights, no float bias): a device, but no dtype to follow.
        first = next(base_layer.parameters(), None)
        return (first.device if first is not None else None), None

    def active_plugin(self) -> str | None:
        """Name of the adapter whose plugin runs, or None when the layer runs as the base model. A recompute of
        gradient checkpointing runs the plugin its forward ran."""
        active = [] if self.disable_adapters else [name for name in self.active_adapters if name in self.ratio]
        if len(active) > 1:
            raise ValueError(
                f"Variator runs exactly one adapter at a time, but {active} are active. "
                "Call `set_adapter` with a single adapter name."
            )
        plugin = active[0] if active else None
        # Only training runs are checkpointed; inference skips the lookup (and its `torch.compile` graph break).
        return self.padding.plugin_of(self, plugin) if self.training else plugin

    def _run_uncompressed(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base FFN on `hidden` as it is. In training, the forward is noted all the same: a recompute of gradient
        checkpointing must not run a plugin where its forward ran none (`PaddingContext.call_of`)."""
        if self.training:
            self.padding.call_of(self, hidden)
        return self.base_layer(hidden, *args, **kwargs)

    def _init_decompressor(self) -> None:
        for name in DECOMPRESSOR_NAMES:
            setattr(self, name, nn.ModuleDict())

    def _add_decompressor(self, adapter_name: str, config: VariatorConfig) -> None:
        adapter = DecompressionAdapter.create(self.hidden_size, config.adapter_dim)
        for name, module in zip(DECOMPRESSOR_NAMES, adapter, strict=True):
            getattr(self, name)[adapter_name] = module

    def _decompressor(self, adapter_name: str) -> DecompressionAdapter:
        return DecompressionAdapter(*(getattr(self, name)[adapter_name] for name in DECOMPRESSOR_NAMES))

    def _decompress(
        self, ffn_output: torch.Tensor, tokens: torch.Tensor, layout: GroupLayout, adapter_name: str
    ) -> torch.Tensor:
        adapter = self._decompressor(adapter_name)
        offloaded = [(module, hook) for module in adapter if (hook := offloading_hook(module)) is not None]
        if not offloaded:
            return decompress(ffn_output, tokens, layout, adapter)
        # accelerate's offloading (a `device_map` with "cpu" or "disk", `cpu_offload`) keeps each Linear's weights on
        # the meta device and loads them for that Linear's own forward only; decompression reads them directly.
        for module, hook in offloaded:
            hook.pre_forward(module)
        try:
            return decompress(ffn_output, tokens, layout, adapter)
        finally:
            for module, hook in offloaded:
                hook.post_forward(module, None)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            "A Variator plugin changes the sequence length inside the FFN and cannot be merged into weights. "
            "Use `unload()` to get the base model back, or keep the adapter and switch with `set_adapter`."
        )

    def unmerge(self) -> None:
        pass

    def _plan(self, hidden: torch.Tensor, adapter_name: str) -> tuple[torch.Tensor, GroupLayout | None]:
        """`hidden` as `(B, N, H)` sequences, and their group layout (None when nothing is compressed: a single token
        per row, as in every cached decoding step). Sequences are `hidden` as it is, or regrouped into the batch's
        sequences where the architecture flattened the tokens to `(B * N, H)` before its FFN (OPT)."""
        if hidden.dim() not in (2, 3):
            raise ValueError(
                f"Variator expects FFN inputs of shape (batch, seq_len, hidden) or (tokens, hidden), got "
                f"{tuple(hidden.shape)}."
            )
        call = self.padding.call_of(self, hidden, adapter_name)
        sequences = hidden
        if hidden.dim() == 2:
            batch, seq_len = self.padding.sequence_shape(hidden.shape[0], call)
            sequences = hidden.view(batch, seq_len, hidden.shape[-1])
        batch, seq_len = sequences.shape[:2]
        if seq_len == 1:
            return sequences, None
        ratio, exact_last_token = self.ratio[adapter_name], self.exact_last_token[adapter_name]
        return sequences, self.padding.layout(batch, seq_len, ratio, exact_last_token, sequences.device, call)

    @staticmethod
    def _flattened_like(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """`(B, L, D)` `tensor` flattened to `(B * L, D)` where the architecture handed the layer a flattened
        `reference` (OPT), as it is otherwise."""
        return tensor.flatten(0, 1) if reference.dim() == 2 else tensor

    def __repr__(self) -> str:
        return "variator." + super().__repr__()


class VariatorFFN(VariatorLayer):
    """Wraps a whole FFN: compress -> FFN on N/k vectors -> decompress."""

    adapter_layer_names = ("variator_compressor", *DECOMPRESSOR_NAMES)

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: VariatorConfig, padding: PaddingContext
    ) -> None:
        super().__init__(base_layer, padding, ffn_hidden_size(base_layer))
        # A mixture-of-experts block, whose router's logits transformers may collect for its load-balancing loss.
        self.routes_tokens = routed_experts_hidden_size(base_layer) is not None
        self.variator_compressor = nn.ModuleDict()
        self._init_decompressor()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def _add_plugin(self, adapter_name: str, config: VariatorConfig) -> None:
        self.variator_compressor[adapter_name] = init_score(config.ratio, self.hidden_size)
        self._add_decompressor(adapter_name, config)

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_name = self.active_plugin()
        if adapter_name is None:
            return self._run_uncompressed(hidden, *args, **kwargs)
        sequences, layout = self._plan(hidden, adapter_name)
        if layout is None:
            return self.base_layer(hidden, *args, **kwargs)
        compressed = compress(sequences, layout, self.variator_compressor[adapter_name])
        router_logits = recorded_router_logits() if self.routes_tokens else None
        recorded_before = len(router_logits) if router_logits is not None else 0
        ffn_output = self.base_layer(self._flattened_like(compressed, hidden), *args, **kwargs)
        if router_logits is not None and len(router_logits) > recorded_before:
            logits_per_token(router_logits, recorded_before, layout, compressed.shape[:2])
        # Some mixture-of-experts blocks (GPT-OSS, Llama 4) also return their router's scores, which their layer
        # discards: handed back as they are, one row per compressed vector.
        ffn_output, *router_outputs = ffn_output if isinstance(ffn_output, tuple) else (ffn_output,)
        grouped = ffn_output.reshape(compressed.shape)
        restored = self._flattened_like(self._decompress(grouped, sequences, layout, adapter_name), hidden)
        return (restored, *router_outputs) if router_outputs else restored


@torch.compiler.disable
def recorded_router_logits() -> list | None:
    """The list that transformers collects mixture-of-experts router logits in during this forward (asked for with
    `output_router_logits=True`, which its load-balancing loss reads), or None."""
    collected = _OUTPUT_COLLECTOR.get() if _OUTPUT_COLLECTOR is not None else None
    return collected.get("router_logits") if isinstance(collected, dict) else None


@torch.compiler.disable
def logits_per_token(router_logits: list, start: int, layout: GroupLayout, groups: torch.Size) -> None:
    """Give every token its group's router logits, in the entries from `start` that a compressed FFN's router added:
    the load-balancing loss lines them up with the call's `(batch, seq_len)` attention mask, as the base model's."""
    for index in range(start, len(router_logits)):
        logits = router_logits[index]
        if not isinstance(logits, torch.Tensor) or logits.shape[: logits.dim() - 1].numel() != groups.numel():
            continue  # not one row per compressed vector: left as the router gave it
        per_token = repeat_groups(logits.reshape(*groups, logits.shape[-1]), layout)
        router_logits[index] = per_token.reshape(-1, logits.shape[-1]) if logits.dim() == 2 else per_token


class SplitFFNState(threading.local):
    """What the input half of a split FFN hands to its output half within one forward pass (per thread, so one
    model can run forwards from several threads).

    `put` and `take` run outside `torch.compile`'s tracing: dynamo defers writes to thread-local attributes and
    loses them across a graph break, and planning the groups breaks the graph (it reads the mask's values), so the
    output half would find no layout and return the FFN's compressed output.
    """

    def __init__(self) -> None:
        self.layout: GroupLayout | None = None
        self.tokens: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict) -> SplitFFNState:
        # Thread-local storage cannot be copied; a copied model's two halves get one fresh, shared hand-over.
        return type(self)()

    def __reduce__(self) -> tuple:
        # Nor pickled (`torch.save(model)`); pickle's memo still gives both halves the same new one.
        return type(self), ()

    @torch.compiler.disable
    def put(self, layout: GroupLayout | None, tokens: torch.Tensor | None) -> None:
        self.layout, self.tokens = layout, tokens

    @torch.compiler.disable
    def take(self) -> tuple[GroupLayout | None, torch.Tensor | None]:
        # Dropped after use so no activations are kept alive between forward passes.
        layout, tokens = self.layout, self.tokens
        self.layout = self.tokens = None
        return layout, tokens


class VariatorFFNInput(VariatorLayer):
    """Wraps the first half of a split FFN (hidden -> intermediate): compresses its input."""

    adapter_layer_names = ("variator_compressor",)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: VariatorConfig,
        padding: PaddingContext,
        state: SplitFFNState,
    ) -> None:
        super().__init__(base_layer, padding, ffn_hidden_size(base_layer))
        self.state = state
        self.variator_compressor = nn.ModuleDict()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def _add_plugin(self, adapter_name: str, config: VariatorConfig) -> None:
        self.variator_compressor[adapter_name] = init_score(config.ratio, self.hidden_size)

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_name = self.active_plugin()
        if adapter_name is None:
            self.state.put(None, None)
            return self._run_uncompressed(hidden, *args, **kwargs)
        sequences, layout = self._plan(hidden, adapter_name)
        if layout is None:
            self.state.put(None, None)
            return self.base_layer(hidden, *args, **kwargs)
        self.state.put(layout, sequences)
        compressed = compress(sequences, layout, self.variator_compressor[adapter_name])
        return self.base_layer(self._flattened_like(compressed, hidden), *args, **kwargs)


class VariatorFFNOutput(VariatorLayer):
    """Wraps the second half of a split FFN (intermediate -> hidden): decompresses its output."""

    adapter_layer_names = DECOMPRESSOR_NAMES

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: VariatorConfig,
        padding: PaddingContext,
        state: SplitFFNState,
    ) -> None:
        super().__init__(base_layer, padding, linear_shapes(base_layer)[-1][1])
        self.state = state
        self._init_decompressor()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def _add_plugin(self, adapter_name: str, config: VariatorConfig) -> None:
        self._add_decompressor(adapter_name, config)

    def forward(self, intermediate: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        ffn_output = self.base_layer(intermediate, *args, **kwargs)
        layout, tokens = self.state.take()
        adapter_name = self.active_plugin()
        if layout is None or adapter_name is None:
            return ffn_output
        grouped = ffn_output.reshape(*layout.compressed_shape(tokens.shape[0]), ffn_output.shape[-1])
        restored = self._decompress(grouped, tokens, layout, adapter_name)
        return self._flattened_like(restored, ffn_output)


def offloading_hook(module: nn.Module) -> Any:
    """accelerate's hook that keeps `module`'s weights offloaded between its forwards, or None. Also found among the
    hooks of a `SequentialHook`, however deep: accelerate nests one more each time a hook is added with
    `append=True`."""
    hooks = [getattr(module, "_hf_hook", None)]
    while hooks:
        hook = hooks.pop(0)
        if getattr(hook, "offload", False):
            return hook
        hooks.extend(getattr(hook, "hooks", ()))
    return None
