"""Is Variator worth it? Accuracy against measured speed-up, next to what a user would pick instead.

On all-MiniLM-L6-v2 fine-tuned on the offline tweets (the model and split of `benchmarks/quality.py`, whose
`--work-dir` this reads), every point measured in one run on this machine:

- Variator ratio 2 / 4 / 8 with the trained plugins of quality.py (stage 1 + stage 2);
- training-free sequence shortening: untrained plugins (average pooling) and ToMe-style bipartite token merging
  before each FFN (`benchmarks/token_merging.py`), at the same ratios;
- a shallower model: 3 of the 6 layers kept (every other one), fine-tuned exactly like the full model;
- dynamic int8 quantization of the linear layers (`torch.ao.quantization.quantize_dynamic`);
- shorter inputs: truncation to 1/2 and 1/4 of the length;
- Variator + int8.

For each: accuracy on the fixed test split, speed-up of a forward pass at batch 16 x 128 and 16 x 256 (medians of
interleaved repeats against the uncompressed fine-tuned model), extra parameters, disk size. Writes a JSON, a
Pareto plot and a markdown table.

    python benchmarks/quality.py        # first: fine-tuned model + trained plugins in /tmp/peft_variator_quality
    python benchmarks/pareto.py

Quiet machine only for the timings: on 2 cores any other process makes them meaningless.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from peft import PeftModel
from torch.ao.quantization import quantize_dynamic
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer

import peft_variator  # noqa: F401  (registers the method with PEFT)
from peft_variator.data import LABELS, load_tweets, tokenize

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality import training_args  # noqa: E402
from token_merging import merge_before_ffns  # noqa: E402

RATIOS = (2, 4, 8)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="/tmp/peft_variator_quality", help="quality.py's --work-dir")
    parser.add_argument("--plugins", default="adapted-pretrained", help="sub-directory of the trained plugins")
    parser.add_argument("--quality", default="benchmarks/results/quality.json", help="quality.py's JSON")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/results/pareto.json")
    parser.add_argument("--plot", default="docs/pareto.png")
    return parser.parse_args()


@torch.no_grad()
def accuracy(model, dataset, collator, batch_size: int = 128, max_length: int | None = None) -> float:
    model.eval()
    correct = 0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
        labels = batch.pop("labels")
        if max_length is not None:
            batch = {key: value[:, :max_length] for key, value in batch.items()}
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return 100.0 * correct / len(dataset)


@torch.no_grad()
def accuracy_unpadded(model, dataset) -> float:
    """One sequence at a time, for methods that cannot honour padding (token merging)."""
    model.eval()
    correct = 0
    for row in dataset:
        ids = torch.tensor([row["input_ids"]])
        correct += int(
            model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.argmax(-1).item() == row["label"]
        )
    return 100.0 * correct / len(dataset)


def shallow_classifier(model_dir: str, keep: list[int]):
    """The pre-trained model with only the layers `keep` and a fresh 3-way head, to fine-tune."""
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
    )
    model.bert.encoder.layer = torch.nn.ModuleList(model.bert.encoder.layer[i] for i in keep)
    model.config.num_hidden_layers = len(keep)
    return model


def state_size(module: torch.nn.Module) -> int:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "state.pt")
        torch.save(module.state_dict(), path)
        return os.path.getsize(path)


def timings(variants: dict[str, Callable[[dict], None]], shapes: list[tuple[int, int]], repeats: int) -> dict:
    """Median forward latency of every variant at every (batch, seq_len), interleaved, in one run."""
    results = {}
    for batch, seq_len in shapes:
        inputs = {
            "input_ids": torch.randint(1000, 30000, (batch, seq_len)),
            "attention_mask": torch.ones(batch, seq_len, dtype=torch.long),
        }
        names = list(variants)
        samples: dict[str, list[float]] = {name: [] for name in names}
        with torch.inference_mode():
            for step in range(repeats + 1):
                for name in names[step % len(names) :] + names[: step % len(names)]:
                    start = time.perf_counter()
                    variants[name](inputs)
                    if step:
                        samples[name].append(time.perf_counter() - start)
        results[f"{batch}x{seq_len}"] = {name: statistics.median(values) * 1e3 for name, values in samples.items()}
        print(f"{batch}x{seq_len}: " + ", ".join(f"{k} {v:.0f} ms" for k, v in results[f"{batch}x{seq_len}"].items()))
    return results


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with open(args.quality) as handle:
        quality = json.load(handle)
    settings = quality["settings"]
    finetuned_dir = os.path.join(args.work_dir, "finetuned")
    plugins_dir = os.path.join(args.work_dir, args.plugins)
    for path in (finetuned_dir, plugins_dir):
        if not os.path.isdir(path):
            raise SystemExit(f"{path} is missing: run benchmarks/quality.py with --work-dir {args.work_dir} first.")

    tokenizer = AutoTokenizer.from_pretrained(quality["model"])  # quality.py saves the fine-tuned weights only
    collator = DataCollatorWithPadding(tokenizer)
    tweets = tokenize(load_tweets(), tokenizer, max_length=settings["max_length"])
    test = tweets["test"].select(range(quality["test_examples"]))
    test = test.add_column("length", [len(i) for i in test["input_ids"]]).sort("length").remove_columns("length")
    max_length = settings["max_length"]

    full = AutoModelForSequenceClassification.from_pretrained(finetuned_dir).eval()
    base_params = sum(p.numel() for p in full.parameters())
    base_size = state_size(full)

    variator = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(finetuned_dir),
        os.path.join(plugins_dir, f"ratio{RATIOS[0]}"),
        adapter_name=f"ratio{RATIOS[0]}",
    )
    for ratio in RATIOS[1:]:
        variator.load_adapter(os.path.join(plugins_dir, f"ratio{ratio}"), adapter_name=f"ratio{ratio}")
    variator.eval()
    untrained = copy.deepcopy(variator)
    for name, parameter in untrained.named_parameters():
        if "variator_compressor" in name or "variator_up" in name:
            parameter.data.zero_()  # the untrained start: average pooling, zero correction

    # The shallower model: every other layer, fine-tuned exactly like the full model.
    shallow = shallow_classifier(quality["model"], keep=[0, 2, 4])
    finetune = tweets["train"].select(range(settings["finetune_examples"]))
    Trainer(
        model=shallow,
        args=training_args(
            os.path.join(args.work_dir, "shallow-run"),
            argparse.Namespace(**settings),
            learning_rate=settings["finetune_lr"],
            num_train_epochs=settings["finetune_epochs"],
            warmup_steps=10,
        ),
        train_dataset=finetune,
        data_collator=collator,
    ).train()
    shallow.eval()

    int8 = quantize_dynamic(copy.deepcopy(full), {torch.nn.Linear}, dtype=torch.qint8)
    variator_int8 = copy.deepcopy(variator)
    base_linears = {
        name
        for name, module in variator_int8.named_modules()
        if isinstance(module, torch.nn.Linear) and "variator_" not in name
    }
    variator_int8 = quantize_dynamic(variator_int8, base_linears, dtype=torch.qint8)

    def with_adapter(model, ratio, merge_tokens=False):
        def run(inputs):
            model.set_adapter(f"ratio{ratio}")
            with merge_before_ffns(model) if merge_tokens else contextlib.nullcontext():
                model(**inputs)

        return run

    points: dict[str, dict] = {}
    plugin_params = {
        ratio: sum(p.numel() for n, p in variator.named_parameters() if f".ratio{ratio}." in n) for ratio in RATIOS
    }
    plugin_bytes = {
        ratio: os.path.getsize(os.path.join(plugins_dir, f"ratio{ratio}", "adapter_model.safetensors"))
        for ratio in RATIOS
    }

    print("accuracy ...", flush=True)
    points["uncompressed"] = {"accuracy": accuracy(full, test, collator), "params": 0, "bytes": 0}
    for ratio in RATIOS:
        variator.set_adapter(f"ratio{ratio}")
        untrained.set_adapter(f"ratio{ratio}")
        variator_int8.set_adapter(f"ratio{ratio}")
        points[f"Variator r{ratio}"] = {
            "accuracy": accuracy(variator, test, collator),
            "params": plugin_params[ratio],
            "bytes": plugin_bytes[ratio],
        }
        points[f"Variator r{ratio} + int8"] = {
            "accuracy": accuracy(variator_int8, test, collator),
            "params": plugin_params[ratio],
            "bytes": plugin_bytes[ratio] + state_size(variator_int8) - base_size,
        }
        points[f"avg pooling r{ratio}"] = {"accuracy": accuracy(untrained, test, collator), "params": 0, "bytes": 0}
        with merge_before_ffns(untrained):
            points[f"ToMe-style merging r{ratio}"] = {
                "accuracy": accuracy_unpadded(untrained, test),
                "params": 0,
                "bytes": 0,
            }
        print({k: round(v["accuracy"], 2) for k, v in points.items()}, flush=True)
    points["3 of 6 layers"] = {
        "accuracy": accuracy(shallow, test, collator),
        "params": sum(p.numel() for p in shallow.parameters()) - base_params,
        "bytes": state_size(shallow) - base_size,
    }
    points["int8 dynamic"] = {
        "accuracy": accuracy(int8, test, collator),
        "params": 0,
        "bytes": state_size(int8) - base_size,
    }
    for fraction in (2, 4):
        points[f"truncate to 1/{fraction}"] = {
            "accuracy": accuracy(full, test, collator, max_length=max_length // fraction),
            "params": 0,
            "bytes": 0,
        }

    # Speed: every variant a callable on the same inputs, interleaved.
    def plain(model):
        return lambda inputs: model(**inputs)

    def truncated(fraction):
        return lambda inputs: full(**{k: v[:, : v.shape[1] // fraction] for k, v in inputs.items()})

    variants: dict[str, Callable[[dict], None]] = {"uncompressed": plain(full)}
    for ratio in RATIOS:
        variants[f"Variator r{ratio}"] = with_adapter(variator, ratio)
        variants[f"Variator r{ratio} + int8"] = with_adapter(variator_int8, ratio)
        variants[f"avg pooling r{ratio}"] = with_adapter(untrained, ratio)
        variants[f"ToMe-style merging r{ratio}"] = with_adapter(untrained, ratio, merge_tokens=True)
    variants["3 of 6 layers"] = plain(shallow)
    variants["int8 dynamic"] = plain(int8)
    for fraction in (2, 4):
        variants[f"truncate to 1/{fraction}"] = truncated(fraction)

    print("speed ...", flush=True)
    latency = timings(variants, [(16, 128), (16, 256)], args.repeats)
    for shape, medians in latency.items():
        for name, ms in medians.items():
            points[name][f"speedup_{shape}"] = medians["uncompressed"] / ms
            points[name][f"ms_{shape}"] = ms

    report = {
        "command": " ".join(["python", *sys.argv]),
        "model": finetuned_dir,
        "test_examples": test.num_rows,
        "repeats": args.repeats,
        "threads": args.threads,
        "load_average_at_start": os.getloadavg()[0],
        "points": points,
    }
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(report, handle, indent=2)
    plot(points, args.plot)
    print(markdown(points))


def pareto_front(points: dict[str, dict], key: str) -> set[str]:
    front = set()
    for name, p in points.items():
        dominated = any(
            q["accuracy"] >= p["accuracy"] and q[key] >= p[key] and (q["accuracy"], q[key]) != (p["accuracy"], p[key])
            for other, q in points.items()
            if other != name
        )
        if not dominated:
            front.add(name)
    return front


def markdown(points: dict[str, dict]) -> str:
    front = pareto_front(points, "speedup_16x128")
    rows = [
        "| method | accuracy % | speed-up 16x128 | speed-up 16x256 | extra params | extra disk | Pareto (16x128) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, p in sorted(points.items(), key=lambda item: -item[1]["speedup_16x128"]):
        rows.append(
            f"| {name} | {p['accuracy']:.2f} | {p['speedup_16x128']:.2f}x | {p['speedup_16x256']:.2f}x | "
            f"{p['params']:+,} | {p['bytes'] / 1e6:+.1f} MB | {'yes' if name in front else ''} |"
        )
    return "\n".join(rows)


def plot(points: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    for axis, shape in zip(axes, ("16x128", "16x256"), strict=True):
        for name, p in points.items():
            family = name.split(" r")[0] if " r" in name else name
            marker = {"Variator": "o", "Variator + int8": "s"}.get(family.split(" r")[0], "^")
            color = "tab:red" if name.startswith("Variator") else "tab:gray"
            axis.scatter(p[f"speedup_{shape}"], p["accuracy"], marker=marker, color=color)
            axis.annotate(
                name, (p[f"speedup_{shape}"], p["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        axis.set_xlabel(f"measured speed-up vs uncompressed (batch {shape})")
        axis.set_title(f"all-MiniLM-L6-v2 on tweets, batch {shape}")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
