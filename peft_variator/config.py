"""Configuration of Variator compression plugins."""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass, field

from peft.config import PeftConfig

from .registration import VARIATOR


@dataclass
class VariatorConfig(PeftConfig):
    """Configuration of a [`VariatorModel`]: one compression plugin per transformer layer's FFN.

    Before each targeted feed-forward network (FFN) the plugin compresses every `ratio` consecutive hidden vectors into
    one (a learned softmax-weighted sum), so the FFN runs on N/ratio vectors; after the FFN it repeats each output
    `ratio` times and adds a small bottleneck adapter that also reads the token's own FFN input (Xiao et al., 2023,
    arXiv 2310.15724).

    Args:
        ratio (`int`): How many consecutive tokens are compressed into one vector. At least 2.
        adapter_dim (`int`): Bottleneck width of the decompression adapter. At least 1.
        exact_last_token (`bool`, *optional*): Leave the last real token of each sequence out of compression, so its
            FFN output is exact. In a decoder's prompt that token's logits give the first generated token; keeping it
            exact costs one FFN row per sequence. When `None`, on for causal language models (a `*ForCausalLM`
            model or `task_type="CAUSAL_LM"`), off otherwise.
        target_modules (`list[str]` or `str`, *optional*): Whole FFN modules to compress (hidden -> intermediate ->
            hidden). A string is matched as a regex against full module names, a list by exact name or name suffix.
            When `None`, the FFNs are taken from the architecture table for the model's `model_type`, or found by
            structure for other architectures.
        layers_to_transform (`int` or `list[int]`, *optional*): Only compress the FFNs of these layer indices.
        layers_pattern (`str` or `list[str]`, *optional*): Name of the module list holding the layers (e.g.
            `"layers"`, `"h"`), used to read the layer index when `layers_to_transform` is set.
        modules_to_save (`list[str]`, *optional*): Modules apart from the plugins that are trained and saved with
            the adapter, e.g. a classification head.
    """

    ratio: int = field(
        default=4,
        metadata={"help": "Number of consecutive tokens compressed into one vector before the FFN (an integer >= 2)."},
    )
    adapter_dim: int = field(
        default=64,
        metadata={"help": "Bottleneck width of the decompression adapter (an integer >= 1)."},
    )
    exact_last_token: bool | None = field(
        default=None,
        metadata={
            "help": (
                "Leave the last real token of each sequence uncompressed (exact FFN output). None: on for causal "
                "language models, off otherwise."
            )
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": (
                "Whole FFN modules to compress (hidden -> intermediate -> hidden), as a list of names or name "
                "suffixes, or a regex matched against full module names. Leave unset to use the defaults for the "
                "model type, or the FFNs found by structure for other architectures."
            )
        },
    )
    layers_to_transform: list[int] | int | None = field(
        default=None,
        metadata={"help": "Only compress the FFNs of these layer indices (an int or a list of ints)."},
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Name of the module list that holds the layers, used with `layers_to_transform` "
            "(e.g. 'layers', 'h', 'block'). Unset: the first numbered module in a name is the layer index."
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules apart from the plugins to train and save with the adapter, e.g. ['classifier'] for a "
            "classification head."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = VARIATOR
        self.ratio = _positive_int("ratio", self.ratio, minimum=2)
        self.adapter_dim = _positive_int("adapter_dim", self.adapter_dim, minimum=1)
        if self.exact_last_token is not None and not isinstance(self.exact_last_token, bool):
            raise ValueError(f"`exact_last_token` must be True, False or None, got {self.exact_last_token!r}.")
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(isinstance(name, str) and name for name in self.target_modules):
                raise ValueError(
                    f"`target_modules` must be a regex string or a non-empty list of module names, "
                    f"got {self.target_modules!r}."
                )
        elif self.target_modules is not None and not isinstance(self.target_modules, str):
            raise ValueError(
                "`target_modules` must be None, a regex string or a list of module names, "
                f"got {self.target_modules!r}."
            )
        if self.layers_to_transform is not None:
            self.layers_to_transform = _layer_indices(self.layers_to_transform)
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("`layers_pattern` only has an effect together with `layers_to_transform`; set both.")


def _layer_indices(value: object) -> int | list[int]:
    """`layers_to_transform` as an int or a sorted list of distinct ints, as it is saved to JSON: any iterable of
    indices (`range(1, 30)`, a tuple, a set, numpy integers) is accepted."""
    error = ValueError(f"`layers_to_transform` must be a non-negative int or a list of them, got {value!r}.")
    if isinstance(value, (str, bytes)):
        raise error
    try:
        indices = [_index(value)]
        single = True
    except TypeError:
        single = False
        try:
            indices = [_index(item) for item in value]
        except TypeError:
            raise error from None
    if any(index < 0 for index in indices):
        raise error
    return indices[0] if single else sorted(set(indices))


def _index(value: object) -> int:
    # `operator.index` takes ints and numpy integers, and refuses floats; bools are ints, but never an index here.
    if isinstance(value, bool):
        raise TypeError(value)
    return operator.index(value)


def _positive_int(name: str, value: object, minimum: int) -> int:
    # Accept 4.0 (e.g. from a JSON or CLI round-trip) and numpy numbers, but never 2.5: a ratio is a group size.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer():
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)
