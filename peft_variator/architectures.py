"""Where the feed-forward networks (FFNs) are: one table by `model_type`, and discovery by structure for the rest."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FFNLocation:
    """Where the FFNs of one architecture are.

    Attributes:
        layers: regex of the path of one transformer layer that holds an FFN to compress.
        ffn: the whole FFN module, relative to the layer (e.g. `"mlp"`); or, for FFNs split in two modules,
        ffn_input / ffn_output: the half that reads the hidden states (hidden -> intermediate) and the half that writes
            them (intermediate -> hidden).
    """

    layers: str
    ffn: str | None = None
    ffn_input: str | None = None
    ffn_output: str | None = None

    @property
    def is_split(self) -> bool:
        return self.ffn is None

    def target_modules(self) -> str:
        """A regex matching the full names of the modules to wrap."""
        names = [self.ffn] if self.ffn is not None else [self.ffn_input, self.ffn_output]
        alternatives = "|".join(re.escape(name) for name in names)
        return rf"(?:.*\.)?{self.layers}\.(?:{alternatives})"

    def role(self, module_name: str) -> str:
        """`"ffn"`, `"input"` or `"output"`: what part of the FFN the module named `module_name` is."""
        if self.is_split:
            return "input" if module_name.endswith("." + self.ffn_input) or module_name == self.ffn_input else "output"
        return "ffn"

    def partner(self, output_name: str) -> str:
        """For the output half of a split FFN, the full name of its input half."""
        return output_name[: -len(self.ffn_output)] + self.ffn_input


_BERT_STYLE = FFNLocation(layers=r"encoder\.layer\.\d+", ffn_input="intermediate", ffn_output="output.dense")
_T5_ENCODER = FFNLocation(layers=r"encoder\.block\.\d+\.layer\.1", ffn="DenseReluDense")
_DECODER_MLP = FFNLocation(layers=r"layers\.\d+", ffn="mlp")

FFN_LOCATIONS: dict[str, FFNLocation] = {
    # Encoders (all-MiniLM-L6-v2 is a BERT).
    "bert": _BERT_STYLE,
    "roberta": _BERT_STYLE,
    "xlm-roberta": _BERT_STYLE,
    "electra": _BERT_STYLE,
    "distilbert": FFNLocation(layers=r"transformer\.layer\.\d+", ffn="ffn"),
    # Encoder-decoders, as in the paper: encoder FFNs only, the decoder runs uncompressed.
    "t5": _T5_ENCODER,
    "mt5": _T5_ENCODER,
    # Decoder-only LLMs: the prompt is compressed, single-token decoding steps are not.
    "llama": _DECODER_MLP,
    "mistral": _DECODER_MLP,
    "qwen2": _DECODER_MLP,
    "gpt2": FFNLocation(layers=r"h\.\d+", ffn="mlp"),
}


def linear_shapes(module: nn.Module) -> list[tuple[int, int]]:
    """(in_features, out_features) of the linear layers in `module`, in registration order.

    GPT-2's `Conv1D` stores its weight as (in, out) and is read accordingly.
    """
    shapes = []
    for child in module.modules():
        if isinstance(child, nn.Linear):
            shapes.append((child.in_features, child.out_features))
        elif type(child).__name__ == "Conv1D" and getattr(child, "weight", None) is not None:
            shapes.append(tuple(child.weight.shape))
    return shapes


def find_ffns(model: nn.Module, hidden_size: int, within: nn.Module | None = None) -> list[str]:
    """Full names of the FFNs of `model` found by structure, for architectures missing from the table.

    An FFN is the smallest module whose linear layers all map hidden -> I or I -> hidden for one intermediate size
    I != hidden, with at least one of each: e.g. Llama's `mlp` (gate, up, down) but not the decoder layer around it,
    which also holds attention projections. With `within`, only modules inside it are searched (the encoder of an
    encoder-decoder model).
    """
    scope = {id(m) for m in within.modules()} if within is not None else None
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or (scope is not None and id(module) not in scope):
            continue
        if any(name.startswith(prefix + ".") for prefix in found):
            continue
        if _is_whole_ffn(module, hidden_size) and not any(
            _is_whole_ffn(child, hidden_size) for child in module.children()
        ):
            found.append(name)
    if found:
        logger.info("Variator found %d FFNs by structure: %s", len(found), ", ".join(found))
    return found


def _is_whole_ffn(module: nn.Module, hidden_size: int) -> bool:
    shapes = linear_shapes(module)
    if not shapes:
        return False
    intermediate = {out for inp, out in shapes if inp == hidden_size} | {
        inp for inp, out in shapes if out == hidden_size
    }
    if len(intermediate) != 1 or hidden_size in intermediate:
        return False
    size = intermediate.pop()
    return (
        all(shape in {(hidden_size, size), (size, hidden_size)} for shape in shapes)
        and (hidden_size, size) in shapes
        and (size, hidden_size) in shapes
    )


def hidden_size_of(model_config: dict) -> int | None:
    """The model's hidden size from its config, under the names transformers architectures use."""
    for key in ("hidden_size", "d_model", "n_embd", "dim"):
        if isinstance(model_config.get(key), int):
            return model_config[key]
    text_config = model_config.get("text_config")
    if isinstance(text_config, dict):
        return hidden_size_of(text_config)
    return None
