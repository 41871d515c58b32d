"""The model card of a Variator adapter: method, ratios and base model, locally and on the Hub.

PEFT writes a card in `save_pretrained`; transformers 5's `push_to_hub` then replaces it with a generic card
(`library_name: transformers`, no base model, no method). `install_model_card_hooks` wraps the two PeftModel methods
involved so a model carrying Variator adapters always gets `card_for`'s card, listing the adapters actually saved, and
leaves every other method's card untouched.
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


def saved_adapters(model: PeftModel, directory: str) -> list[str]:
    """The Variator adapters saved in `directory`: PEFT writes `default` at its root and any other adapter in a
    subfolder of its name, and `save_pretrained(selected_adapters=...)` may write only some."""
    return [
        name
        for name in sorted(variator_adapters(model), key=lambda name: (name != "default", name))
        if os.path.isfile(os.path.join(directory, "" if name == "default" else name, "adapter_config.json"))
    ]


def card_for(model: PeftModel, adapter_names: list[str], card: ModelCard | None = None) -> ModelCard:
    """`card` (or a new one) completed with the Variator method, the ratio of each adapter in `adapter_names` (as
    `saved_adapters` lists them), the base model and how to load them."""
    loaded = variator_adapters(model)
    adapters = {name: loaded[name] for name in adapter_names}
    card = card or ModelCard.from_template(ModelCardData())
    card.data.library_name = "peft"
    base_model = next(iter(adapters.values())).base_model_name_or_path
    if base_model:
        card.data.base_model = base_model
    ratio_tags = [f"variator-ratio-{ratio}" for ratio in sorted({config.ratio for config in adapters.values()})]
    # The model's own tags (which PEFT's card starts from) name every ratio it carries, saved or not.
    tags = [tag for tag in card.data.tags or [] if not tag.startswith("variator-ratio-") or tag in ratio_tags]
    for tag in ["peft", "variator", *ratio_tags]:
        if tag not in tags:
            tags.append(tag)
    card.data.tags = tags

    rows = "\n".join(
        f"| `{name}` | {config.ratio} | {config.adapter_dim} | {config.task_type or ''} |"
        for name, config in adapters.items()
    )
    base_label = f"`{base_model}`" if base_model else "(not recorded)"
    section = (
        f"{_SECTION}\n\n"
        f"Adapters of [peft-variator](https://arxiv.org/abs/2310.15724) (Variator, Xiao et al., Findings of EMNLP "
        f"2023) for the base model {base_label}. Each compresses every `ratio` consecutive tokens into one before "
        "the feed-forward networks; the base model's weights are not included.\n\n"
        "| adapter | ratio | adapter_dim | task_type |\n|---|---|---|---|\n"
        f"{rows}\n\n"
        f"```python\n{_loading_code(adapter_names)}```\n"
    )
    text = card.text
    if _SECTION in text:
        text = text[: text.index(_SECTION)].rstrip() + "\n"
    card.text = f"{text.rstrip()}\n\n{section}"
    return card


def _loading_code(names: list[str]) -> str:
    """Python that loads adapters `names` from a repository laid out as PEFT saves it."""
    first, *others = names
    lines = ["import peft_variator", "from peft import PeftModel"]
    if first == "default":
        lines.append("model = PeftModel.from_pretrained(base_model, repo_id)")
    else:
        lines.append(
            f'model = PeftModel.from_pretrained(base_model, repo_id, subfolder="{first}", adapter_name="{first}")'
        )
    lines += [f'model.load_adapter(repo_id, adapter_name="{name}", subfolder="{name}")' for name in others]
    if others:
        lines.append(f'model.set_adapter("{others[-1]}")  # switch between them at run time')
    return "".join(line + "\n" for line in lines)


def install_model_card_hooks() -> None:
    """Wrap PeftModel's saving and Hub upload (once) so Variator models get `card_for`'s card."""
    if getattr(PeftModel.save_pretrained, "_variator_card", False):
        return
    for name in ("save_pretrained", "_upload_modified_files"):
        if not callable(getattr(PeftModel, name, None)):
            raise RuntimeError(
                f"peft-variator expects `PeftModel.{name}` to save adapters and their model card; this PEFT / "
                "transformers release has none. Please report it together with your versions."
            )

    original_save = PeftModel.save_pretrained
    original_upload = PeftModel._upload_modified_files

    @functools.wraps(original_save)
    def save_pretrained(self: PeftModel, save_directory: str, *args, **kwargs) -> None:
        original_save(self, save_directory, *args, **kwargs)
        # After the adapters are written, so the card lists those saved (`selected_adapters`). PEFT writes a card on
        # the main process only; other processes have none to complete.
        if os.path.isfile(os.path.join(save_directory, "README.md")):
            complete_card(self, save_directory)

    @functools.wraps(original_upload)
    def _upload_modified_files(self: PeftModel, working_dir: str, *args, **kwargs):
        complete_card(self, working_dir)
        return original_upload(self, working_dir, *args, **kwargs)

    save_pretrained._variator_card = True
    PeftModel.save_pretrained = save_pretrained
    PeftModel._upload_modified_files = _upload_modified_files


def complete_card(model: PeftModel, directory: str) -> None:
    """Complete (or write) `directory`'s README.md with `card_for`'s section for the adapters saved there."""
    names = saved_adapters(model, directory)
    if not names:
        return
    path = os.path.join(directory, "README.md")
    card = ModelCard.load(path) if os.path.exists(path) else None
    card_for(model, names, card).save(path)
