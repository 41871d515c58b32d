"""Run a Variator model's FFN wiring with other sequence-shortening rules, for the benchmarks' baselines."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator

import torch

from peft_variator.layer import VariatorLayer


@contextlib.contextmanager
def replaced_forwards(model: torch.nn.Module, forwards: dict[type, Callable]) -> Iterator[None]:
    """Within the block, every Variator layer of `model` runs `forwards[type(layer)]` (bound to the layer) instead
    of its own forward; the model is exactly as before afterwards."""
    layers = [module for module in model.modules() if isinstance(module, VariatorLayer)]
    for layer in layers:
        layer.forward = types.MethodType(forwards[type(layer)], layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
