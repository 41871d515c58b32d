"""Where the feed-forward networks (FFNs) are: one table by `model_type`, and discovery by structure for the rest."""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import PreTrainedModel

from .registration import PREFIX

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FFNLocation:
    """Where the FFNs of one architecture are.

    Attributes:
        layers: regex of the path of one transformer layer that holds an FFN to compress.
        modules: the FFN module relative to the layer (e.g. `("mlp",)`), or, for FFNs split over two modules, the
            half that reads the hidden states and the half that writes them (e.g. `("intermediate", "output.dense")`).
    """

    layers: str
    modules: tuple[str, ...]

    def target_modules(self) -> str:
        """A regex matching the full names of the modules to wrap."""
        alternatives = "|".join(re.escape(name) for name in self.modules)
        return rf"(?:.*\.)?{self.layers}\.(?:{alternatives})"


_BERT_STYLE = FFNLocation(layers=r"encoder\.layer\.\d+", modules=("intermediate", "output.dense"))
_T5_ENCODER = FFNLocation(layers=r"encoder\.block\.\d+\.layer\.1", modules=("DenseReluDense",))
_DECODER_MLP = FFNLocation(layers=r"layers\.\d+", modules=("mlp",))

FFN_LOCATIONS: dict[str, FFNLocation] = {
    # Encoders (all-MiniLM-L6-v2 is a BERT).
    "bert": _BERT_STYLE,
    "roberta": _BERT_STYLE,
    "xlm-roberta": _BERT_STYLE,
    "electra": _BERT_STYLE,
    "distilbert": FFNLocation(layers=r"transformer\.layer\.\d+", modules=("ffn",)),
    # Encoder-decoders, as in the paper: encoder FFNs only, the decoder runs uncompressed.
    "t5": _T5_ENCODER,
    "mt5": _T5_ENCODER,
    # Decoder-only LLMs: the prompt is compressed, single-token decoding steps are not.
    "llama": _DECODER_MLP,
    "mistral": _DECODER_MLP,
    "qwen2": _DECODER_MLP,
    "gpt2": FFNLocation(layers=r"h\.\d+", modules=("mlp",)),
}


def ffn_role(module: nn.Module, name: str, hidden_size: int | None) -> str | None:
    """What part of an FFN `module` (named `name` in the model) is, from its linear layers: `"ffn"` (hidden -> I ->
    hidden, the whole FFN), `"input"` (hidden -> I, the first half of a split FFN), `"output"` (I -> hidden, the
    second half), or None. A mixture-of-experts block that is a part of a layer is a whole FFN."""
    expert_hidden_size = expert_block_hidden_size(module)
    if expert_hidden_size is not None and hidden_size in (None, expert_hidden_size) and _is_layer_part(name):
        return "ffn"
    shapes = linear_shapes(module)
    if not shapes:
        return None
    first_in, last_out = shapes[0][0], shapes[-1][1]
    widens = any(inp == first_in and out != first_in for inp, out in shapes)
    if first_in == last_out and widens and (hidden_size is None or first_in == hidden_size):
        return "ffn"
    if hidden_size is not None and first_in == hidden_size and last_out != hidden_size:
        return "input"
    if hidden_size is not None and last_out == hidden_size and first_in != hidden_size:
        return "output"
    return None


def expert_block_hidden_size(module: nn.Module) -> int | None:
    """The hidden size a mixture-of-experts block reads and writes, or None when `module` is not one that Variator
    can wrap whole: one that holds routed experts and their router (`routed_experts_hidden_size`) and whose forward
    takes the hidden states and nothing else (the experts module on its own also takes the routing; NLLB-MoE's block
    also takes a padding mask per token, which compressed vectors would not match)."""
    return routed_experts_hidden_size(module) if _takes_hidden_states_alone(module) else None


def _takes_hidden_states_alone(module: nn.Module) -> bool:
    named = [
        parameter
        for parameter in inspect.signature(_unwrapped(module).forward).parameters.values()
        if parameter.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    return len(named) == 1


def routed_experts_hidden_size(module: nn.Module) -> int | None:
    """The hidden size of the routed experts that `module` holds with their router, or None when it holds none.

    transformers stacks the routed experts' weights into 3-D parameters `(num_experts, ., .)` (Mixtral, Qwen3-MoE,
    OLMoE, GPT-OSS, DeepSeek-V2/V3, Llama 4, ...), which `linear_shapes` does not see, or keeps each expert as a
    module in a `ModuleDict` / `ModuleList` (Switch Transformers, NLLB-MoE), or lays the experts' matrices end to
    end in 2-D parameters `(num_experts * intermediate, hidden)` held outside any Linear (DBRX). Recognised by the
    parameters: at least
    two experts, each reading and writing vectors of the router's input size, a router (a `(num_experts, hidden)`
    matrix), other matrices only where they touch hidden-size vectors (shared experts and their gate) or hold
    per-expert values (biases, routing statistics), and no convolution (whose 3-D weights mix tokens). Shape alone
    cannot tell a block that is one layer's FFN from experts used inside attention (JetMoE's): `ffn_role` and
    `find_ffns` also ask for a part of a layer.
    """
    owners = [child for _, child in base_named_modules(module)]
    parameters = [parameter for child in owners for parameter in child.parameters(recurse=False)]
    if any(parameter.dim() > 3 for parameter in parameters):
        return None
    if any(isinstance(child, nn.modules.conv._ConvNd) for child in owners):
        return None
    stacked = [parameter for parameter in parameters if parameter.dim() == 3]
    raw_matrices = [
        parameter
        for child in owners
        if not isinstance(child, nn.Linear)
        for parameter in child.parameters(recurse=False)
        if parameter.dim() == 2
    ]
    # Not the experts' own per-expert matrices (GPT-OSS keeps `(num_experts, hidden)` biases next to its weights).
    routers = {
        tuple(parameter.shape)
        for child in owners
        if not any(parameter.dim() == 3 for parameter in child.parameters(recurse=False))
        for parameter in child.parameters(recurse=False)
        if parameter.dim() == 2
    }
    for num_experts, hidden_size in sorted(shape for shape in routers if shape[0] != shape[1]):
        if stacked:
            experts_fit = len(stacked) >= 2 and all(
                parameter.shape[0] == num_experts and hidden_size in parameter.shape[1:] for parameter in stacked
            )
        elif listed := _listed_experts(module, hidden_size):
            experts_fit = len(listed) == num_experts
        else:
            experts_fit = _experts_end_to_end(raw_matrices, num_experts, hidden_size)
        if experts_fit and all(
            parameter.dim() == 1 or hidden_size in parameter.shape or num_experts in parameter.shape
            for parameter in parameters
        ):
            return hidden_size
    return None


def _experts_end_to_end(matrices: list[nn.Parameter], num_experts: int, hidden_size: int) -> bool:
    """Whether `matrices` (2-D parameters held outside any Linear) are at least two experts' weights laid end to end,
    all `(num_experts * intermediate, hidden)` with an intermediate size of at least two (DBRX's `w1`, `v1`, `w2`)."""
    shapes = {tuple(matrix.shape) for matrix in matrices}
    if len(matrices) < 2 or len(shapes) != 1:
        return False
    rows, columns = shapes.pop()
    return columns == hidden_size and rows % num_experts == 0 and rows // num_experts >= 2


def _listed_experts(module: nn.Module, hidden_size: int) -> list[nn.Module]:
    """Experts kept as modules: the children with linear layers of a `ModuleDict` / `ModuleList` inside `module`,
    when there are at least two and all are whole FFNs (hidden -> I -> hidden) of the same shapes; otherwise none."""
    for _, container in base_named_modules(module):
        if isinstance(container, (nn.ModuleDict, nn.ModuleList)):
            experts = [child for child in container.children() if linear_shapes(child)]  # not its dropout
            if len(experts) >= 2 and all(
                _is_whole_ffn(expert, hidden_size) and linear_shapes(expert) == linear_shapes(experts[0])
                for expert in experts
            ):
                return experts
    return []


def ffn_hidden_size(module: nn.Module) -> int:
    """The hidden size a whole FFN or the first half of a split one reads: its first linear layer's input, or a
    mixture-of-experts block's."""
    expert_hidden_size = expert_block_hidden_size(module)
    return expert_hidden_size if expert_hidden_size is not None else linear_shapes(module)[0][0]


def more_than_an_ffn(module: nn.Module, hidden_size: int | None) -> str | None:
    """Why a module that `ffn_role` calls a whole FFN is more than one, or None: it holds attention's hidden -> hidden
    projections, adds the residual itself (a `residual` argument), holds an FFN with only norms around it, or
    normalises hidden-size vectors itself. Compressing it would compress attention or the residual stream as well.
    A mixture-of-experts block, which holds FFNs (shared experts) next to other per-token weights (router, experts),
    is one FFN for Variator."""
    if hidden_size is None:
        return None
    if any(inp == out == hidden_size for inp, out in linear_shapes(module)):
        return "it has hidden -> hidden projections, as attention does"
    if "residual" in inspect.signature(_unwrapped(module).forward).parameters:
        return "it adds the residual itself (its forward takes `residual`)"
    for name, child in base_named_modules(module):
        if name and _is_whole_ffn(child, hidden_size):
            inside = {id(parameter) for parameter in _base_parameters(child)}
            around = [parameter for parameter in _base_parameters(module) if id(parameter) not in inside]
            if all(parameter.dim() <= 1 for parameter in around):
                return f"it is the FFN {name!r} with what surrounds it (norms, the residual)"
    for name, child in base_named_modules(module):
        if name and _normalizes_hidden_states(child, hidden_size):
            # A norm over hidden-size vectors inside an FFN block sits at its input or output, with the residual
            # (Funnel and XLNet: `layer_norm(x + ffn(x))`); one inside the FFN would normalise intermediate vectors.
            return f"it normalises hidden states itself ({name!r}), as an FFN block with its residual does"
    return None


def _normalizes_hidden_states(module: nn.Module, hidden_size: int) -> bool:
    weight = getattr(module, "weight", None)
    is_norm = isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower()
    return is_norm and isinstance(weight, torch.Tensor) and tuple(weight.shape) == (hidden_size,)


def parallel_inputs(parent: nn.Module, half: str) -> list[str]:
    """The other children of `parent` that map the hidden states exactly as its child `half` does: a gated FFN's
    gate and up projections (Llama's `gate_proj` / `up_proj`) both read the FFN input, so neither alone is its first
    half."""
    shapes = linear_shapes(getattr(parent, half))
    return [
        name
        for name, child in parent.named_children()
        if name != half and not list(child.children()) and linear_shapes(child) == shapes
    ]


def pair_split_halves(inputs: list[str], outputs: list[str]) -> dict[str, str]:
    """Match each output half of a split FFN to its input half: the one input half inside the nearest ancestor that
    holds any (BERT: `layer.3.intermediate` for `layer.3.output.dense`; OPT: `layers.3.fc1` for `layers.3.fc2`).

    Raises ValueError naming the module when a half has no partner, so no model is left half-converted.
    """
    pairs: dict[str, str] = {}
    for output in outputs:
        ancestor, partner = output, None
        while "." in ancestor and partner is None:
            ancestor = ancestor.rpartition(".")[0]
            near = [name for name in inputs if name.startswith(ancestor + ".")]
            if len(near) > 1:
                break
            partner = near[0] if near else None
        if partner is None or partner in pairs.values():
            raise ValueError(
                f"{output!r} is the second half of a split FFN (intermediate -> hidden) without a first half "
                "(hidden -> intermediate) targeted next to it. Target both halves of each FFN, or a module holding "
                "the whole FFN."
            )
        pairs[output] = partner
    unpaired = sorted(set(inputs) - set(pairs.values()))
    if unpaired:
        raise ValueError(
            f"{unpaired[0]!r} maps hidden -> intermediate only: it is half an FFN, and its second half (intermediate "
            "-> hidden) is not targeted. Target the module holding the whole FFN (e.g. `mlp`), or both halves."
        )
    return pairs


def linear_shapes(module: nn.Module) -> list[tuple[int, int]]:
    """(in_features, out_features) of the linear layers in `module`, in registration order.

    GPT-2's `Conv1D` stores its weight as (in, out) and is read accordingly.
    """
    shapes = []
    for _, child in base_named_modules(module):
        if isinstance(child, nn.Linear):
            shapes.append((child.in_features, child.out_features))
        elif type(child).__name__ == "Conv1D" and getattr(child, "weight", None) is not None:
            shapes.append(tuple(child.weight.shape))
    return shapes


def find_ffns(model: nn.Module, hidden_size: int, within: nn.Module | None = None) -> list[str]:
    """Full names of the FFNs of `model` found by structure, for architectures missing from the table.

    - A whole FFN is the smallest module whose linear layers all map hidden -> I or I -> hidden for one intermediate
      size I != hidden (gate and up may be one fused hidden -> 2I Linear), with at least one of each, no more than two
      reading the hidden states (three are attention's queries, keys and values) and nothing but vectors besides:
      e.g. Llama's `mlp`, not the decoder layer around it. Where such a module is more than an FFN (it holds the norm,
      or adds the residual: Funnel's FFN block, FNet's whole layer, BLOOM's `mlp`), its two linears are returned
      instead, as the halves of a split FFN.
    - A mixture-of-experts block that is a part of a layer (a child of a numbered module: `layers.3.mlp`) is a whole
      FFN: its router and experts run on the compressed vectors. Deeper down, experts are part of something else
      (JetMoE's attention). A block that cannot be wrapped whole (NLLB-MoE's takes a per-token padding mask) is left
      uncompressed, experts included, with a warning.
    - Inside a stack of layers (a name with a numbered segment), a module with two children that each hold one
      linear layer, hidden -> I and I -> hidden, gives those two: OPT's `fc1` / `fc2`, the `intermediate.dense` /
      `output.dense` of BERT-style layers. Outside the stack such a pair is something else (OPT-350m's `project_out`
      / `project_in` around its decoder).

    With `within`, only modules inside it are searched (the encoder of an encoder-decoder model).
    """
    scope = {id(m) for _, m in base_named_modules(within)} if within is not None else None
    found: list[str] = []
    passed_over: list[str] = []
    for name, module in base_named_modules(model):
        if not name or (scope is not None and id(module) not in scope):
            continue
        if any(name.startswith(prefix + ".") for prefix in found + passed_over):
            continue
        if (
            hidden_size is not None
            and _is_layer_part(name)
            and routed_experts_hidden_size(module) == hidden_size
            # The smallest module holding them: a layer's list of sub-layers (T5-style) holds them too.
            and not any(routed_experts_hidden_size(child) == hidden_size for child in _unwrapped(module).children())
        ):
            if _takes_hidden_states_alone(module) and more_than_an_ffn(module, hidden_size) is None:
                found.append(name)
            else:
                # Each expert sees the tokens routed to it, from every sequence of the batch: compressing one alone
                # would mix tokens of different sequences.
                passed_over.append(name)
                logger.warning(
                    "Variator leaves the mixture-of-experts block %s uncompressed: it cannot wrap it whole.", name
                )
        elif _is_whole_ffn(module, hidden_size):
            if any(_is_whole_ffn(child, hidden_size) for child in _unwrapped(module).children()):
                continue
            if _is_bottleneck(linear_shapes(module), hidden_size):
                passed_over.append(name)
                logger.info("Variator leaves %s uncompressed: a bottleneck, narrower than an FFN.", name)
            elif more_than_an_ffn(module, hidden_size) is None:
                found.append(name)
            else:
                linears = _leaf_linears(module)
                halves = _ffn_pair(linears, hidden_size) if len(linears) == 2 else []
                found.extend(f"{name}.{half}" for half in halves)
        elif _is_in_layer_stack(name):
            # Children holding exactly one linear layer each (attention holds several).
            singles = []
            for child_name, child in _unwrapped(module).named_children():
                linears = _leaf_linears(child)
                if len(linears) == 1:
                    leaf, shape = linears[0]
                    singles.append((f"{child_name}.{leaf}" if leaf else child_name, shape))
            halves = _ffn_pair(singles, hidden_size)
            shapes = [shape for single, shape in singles if single in halves]
            if halves and not _is_bottleneck(shapes, hidden_size) and not _holds_an_ffn(module, hidden_size):
                found.extend(f"{name}.{half}" for half in halves)
    if found:
        logger.info("Variator found %d FFNs by structure: %s", len(found), ", ".join(found))
    return found


def _is_bottleneck(shapes: list[tuple[int, int]], hidden_size: int | None) -> bool:
    """Whether linears of these shapes map hidden -> r -> hidden through a width r under a quarter of the hidden size:
    an adapter or a low-rank map (Gemma 3n's LAUREL, an adaptive norm's conditioning MLP), whose plugin would cost more
    than it saves, not an FFN, which widens (or, in a mixture of experts, narrows by far less)."""
    widths = [out for inp, out in shapes if inp == hidden_size] + [inp for inp, out in shapes if out == hidden_size]
    return hidden_size is not None and bool(widths) and 4 * max(widths) < hidden_size


def _holds_an_ffn(module: nn.Module, hidden_size: int | None) -> bool:
    """Whether a module below `module` is a whole FFN or a mixture-of-experts block. A layer that has one has its FFN:
    a pair of single linears hidden -> I -> hidden beside it is something else (Gemma 3n / Gemma 4 gate a per-token
    input between their `per_layer_input_gate` and `per_layer_projection`)."""
    return any(
        _is_whole_ffn(descendant, hidden_size) or routed_experts_hidden_size(descendant) == hidden_size
        for _, descendant in base_named_modules(module)
        if descendant is not module
    )


def _leaf_linears(module: nn.Module) -> list[tuple[str, tuple[int, int]]]:
    """The linear layers in `module` (itself included): relative name and (in, out) shape."""
    linears = []
    for name, leaf in base_named_modules(module):
        shapes = linear_shapes(leaf) if not list(leaf.children()) else []
        if len(shapes) == 1:
            linears.append((name, shapes[0]))
    return linears


def _ffn_pair(linears: list[tuple[str, tuple[int, int]]], hidden_size: int) -> list[str]:
    """The names of the one linear layer mapping hidden -> I and the one mapping I -> hidden among `linears`, or
    nothing when either is missing or not alone."""
    widening = [(name, shape) for name, shape in linears if shape[0] == hidden_size and shape[1] != hidden_size]
    if len(widening) != 1:
        return []
    narrowing = [name for name, shape in linears if shape == (widening[0][1][1], hidden_size)]
    return [widening[0][0], narrowing[0]] if len(narrowing) == 1 else []


def _is_whole_ffn(module: nn.Module, hidden_size: int) -> bool:
    shapes = linear_shapes(module)
    narrowing = {inp for inp, out in shapes if out == hidden_size and inp != hidden_size}
    if len(narrowing) != 1:
        return False
    size = narrowing.pop()
    # Gate and up projections may be one fused Linear (Phi-3's `gate_up_proj`, hidden -> 2 * I).
    widening = {(hidden_size, size), (hidden_size, 2 * size)}
    linears = [leaf for _, leaf in base_named_modules(module) if not list(leaf.children()) and linear_shapes(leaf)]
    return (
        all(shape in widening | {(size, hidden_size)} for shape in shapes)
        # Gate and up at most: three (queries, keys, values) are attention with heads wider than the hidden size.
        and 1 <= sum(shape in widening for shape in shapes) <= 2
        # Nothing but vectors (biases, norms) besides: a convolution or state matrices mix tokens (Mamba's mixer, a
        # conformer's convolution module, both shaped hidden -> 2C -> hidden).
        and all(
            parameter.dim() <= 1
            for parameter in _base_parameters(module)
            if all(parameter is not leaf.weight for leaf in linears)
        )
    )


def base_named_modules(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """`module.named_modules()` as the base model has them: a tuner layer of a Variator adapter added earlier stands
    for its base layer, under the tuner layer's own name, so a second adapter finds the FFNs the first one did and
    does not take its plugin weights for the FFN's. Each module once, under its first name, as in `named_modules()`.
    """
    seen: set[int] = set()
    pending = [("", module)]
    while pending:
        name, current = pending.pop()
        current = _unwrapped(current)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield name, current
        children = [
            (f"{name}.{child_name}" if name else child_name, child) for child_name, child in current.named_children()
        ]
        pending.extend(reversed(children))


def _unwrapped(module: nn.Module) -> nn.Module:
    """The base layer of a Variator tuner layer, any other module as it is. Other methods' tuner layers (LoRA) are
    not looked through: an FFN holding them is not Variator's to wrap."""
    variator = isinstance(module, BaseTunerLayer) and any(
        name.startswith(PREFIX) for name in module.adapter_layer_names
    )
    return module.get_base_layer() if variator else module


def _base_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of `module` without those of Variator plugins inside it."""
    return [parameter for _, child in base_named_modules(module) for parameter in child.parameters(recurse=False)]


def _is_in_layer_stack(name: str) -> bool:
    """Whether the module named `name` is, or is inside, a numbered module (`encoder.layer.3`, `layers.3.mlp`)."""
    return re.search(r"(?:^|\.)\d+(?:\.|$)", name) is not None


def _is_layer_part(name: str) -> bool:
    """Whether the module named `name` is a direct child of a numbered module: one part of one layer of a stack
    (`layers.3.mlp`, not `layers.3.self_attention.experts`)."""
    return re.fullmatch(r"(?:.*\.)?\d+\.[^.]+", name) is not None


def own_width_ffn(model: nn.Module, key: str, module: nn.Module) -> int | None:
    """The width of `module` (named `key` in `model`) when it is a whole FFN (or mixture-of-experts block) of its own
    tower's width, which differs from the model's (a vision tower next to a wider language model); else None.

    The width is read from the innermost model holding it (`hidden_size`, `embed_dim`, ... of its config), as the
    order its Linears were registered in cannot tell an FFN's width from its intermediate size."""
    if ffn_role(module, key, None) != "ffn":
        return None
    width = ffn_hidden_size(module)
    if not (_is_whole_ffn(module, width) or expert_block_hidden_size(module) == width):
        return None
    names = key.split(".")
    for end in range(len(names) - 1, -1, -1):
        tower = model.get_submodule(".".join(names[:end]))
        config = getattr(tower, "config", None)
        if isinstance(tower, PreTrainedModel) and config is not None:
            widths = {getattr(config, name, None) for name in ("hidden_size", "embed_dim", "d_model", "n_embd", "dim")}
            return width if width in widths else None
    return None


def hidden_size_of(model_config: dict) -> int | None:
    """The model's hidden size from its config, under the names transformers architectures use."""
    for key in ("hidden_size", "d_model", "n_embd", "dim"):
        if isinstance(model_config.get(key), int):
            return model_config[key]
    # A vision-language model's language model; an encoder-decoder pair's encoder (the only side compressed).
    for key in ("text_config", "encoder"):
        if isinstance(model_config.get(key), dict):
            return hidden_size_of(model_config[key])
    return None


def layer_index(key: str, layers_pattern: str | list[str] | None) -> int | None:
    """The index of the transformer layer a module named `key` is in: the first numbered segment, or the one after
    `layers_pattern` (e.g. `"layers"`); None when there is none."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or [r"[^.]*"])
    for pattern in patterns:
        # The first numbered segment is the layer index (not, e.g., an expert index further down).
        match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<index>\d+)\.", key)
        if match:
            return int(match.group("index"))
    return None
