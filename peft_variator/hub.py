"""The model card of a Variator adapter: method, ratios and base model, locally and on the Hub.

PEFT writes a card in `save_pretrained`; transformers 5's `push_to_hub` then replaces it with a generic card
(`library_name: transformers`, no base model, no method). `install_model_card_hooks` wraps the two PeftModel methods
involved so a model carrying Variator adapters always gets `card_for`'s card, and leaves every other method's card
untouched.
"""

from __future__ import annotations

import functools
import os

from huggingface_hub import ModelCard, ModelCardData
from peft import PeftModel

from .config import VariatorConfig

_SECTION = "## Variator compression plugins"


def variator_adapters(model: PeftModel) -> dict[str, VariatorConfig]:
    return {name: config for name, config in model.peft_config.items() if isinstance(config, VariatorConfig)}


def card_for(model: PeftModel, card: ModelCard | None = None) -> ModelCard:
    """`card` (or a new one) completed with the Variator method, every adapter's ratio and the base model."""
    adapters = variator_adapters(model)
    card = card or ModelCard.from_template(ModelCardData())
    card.data.library_name = "peft"
    base_model = next(iter(adapters.values())).base_model_name_or_path
    if base_model:
        card.data.base_model = base_model
    ratios = sorted({config.ratio for config in adapters.values()})
    tags = list(card.data.tags or [])
    for tag in ["peft", "variator", *[f"variator-ratio-{ratio}" for ratio in ratios]]:
        if tag not in tags:
            tags.append(tag)
    card.data.tags = tags

    rows = "\n".join(
        f"| `{name}` | {config.ratio} | {config.adapter_dim} | {config.task_type or ''} |"
        for name, config in sorted(adapters.items())
    )
    section = (
        f"{_SECTION}\n\n"
        f"Adapters of [peft-variator](https://arxiv.org/abs/2310.15724) (Variator, Xiao et al., Findings of EMNLP "
        f"2023) for the base model `{base_model}`. Each compresses every `ratio` consecutive tokens into one before "
        "the feed-forward networks; the base model's weights are not included.\n\n"
        "| adapter | ratio | adapter_dim | task_type |\n|---|---|---|---|\n"
        f"{rows}\n\n"
        "```python\nimport peft_variator\nfrom peft import PeftModel\n"
        "model = PeftModel.from_pretrained(base_model, repo_id)  # then model.set_adapter(name)\n```\n"
    )
    text = card.text
    if _SECTION in text:
        text = text[: text.index(_SECTION)].rstrip() + "\n"
    card.text = f"{text.rstrip()}\n\n{section}"
    return card


def install_model_card_hooks() -> None:
    """Wrap PeftModel's card writing and Hub upload (once) so Variator models get `card_for`'s card."""
    if getattr(PeftModel.create_or_update_model_card, "_variator_card", False):
        return
    for name in ("create_or_update_model_card", "_upload_modified_files"):
        if not callable(getattr(PeftModel, name, None)):
            raise RuntimeError(
                f"peft-variator expects `PeftModel.{name}` to write model cards; this PEFT / transformers release "
                "has none. Please report it together with your versions."
            )

    original_card = PeftModel.create_or_update_model_card
    original_upload = PeftModel._upload_modified_files

    @functools.wraps(original_card)
    def create_or_update_model_card(self: PeftModel, output_dir: str) -> None:
        original_card(self, output_dir)
        _complete_card(self, output_dir)

    @functools.wraps(original_upload)
    def _upload_modified_files(self: PeftModel, working_dir: str, *args, **kwargs):
        _complete_card(self, working_dir)
        return original_upload(self, working_dir, *args, **kwargs)

    create_or_update_model_card._variator_card = True
    PeftModel.create_or_update_model_card = create_or_update_model_card
    PeftModel._upload_modified_files = _upload_modified_files


def _complete_card(model: PeftModel, directory: str) -> None:
    if not variator_adapters(model):
        return
    path = os.path.join(directory, "README.md")
    card = ModelCard.load(path) if os.path.exists(path) else None
    card_for(model, card).save(path)
