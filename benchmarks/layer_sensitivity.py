"""SmolLM2-135M-Instruct: how much does compressing each single layer's FFN cost in next-token agreement?

For every decoder layer on its own (and for a few layer sets), untrained ratio-`k` plugins (average pooling, zero
correction) are put on that layer only, and the share of held-out prompts whose first generated token (greedy) is
unchanged is measured, as in benchmarks/agreement.py. It shows where plugins must work hardest and which layers a
`layers_to_transform` choice should leave alone.

    python benchmarks/layer_sensitivity.py [--ratio 4] [--eval-examples 150]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from peft import get_peft_model
from transformers import DataCollatorWithPadding

import peft_variator  # noqa: F401  (registers the method with PEFT)
from peft_variator import VariatorConfig
from peft_variator.data import load_tweets, tokenize

sys.path.insert(0, os.path.dirname(__file__))
from agreement import load_smollm2, next_token_logits  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=int, default=4)
    parser.add_argument("--eval-examples", type=int, default=150)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/results/layer_sensitivity.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer, base = load_smollm2()
    collator = DataCollatorWithPadding(tokenizer)
    tweets = tokenize(load_tweets(), tokenizer, max_length=args.max_length).remove_columns("label")
    held_out = tweets["test"].select(range(args.eval_examples)).filter(lambda row: len(row["input_ids"]) >= 2)
    reference = next_token_logits(base, held_out, collator).argmax(-1)

    num_layers = base.config.num_hidden_layers
    layer_sets = {"all": list(range(num_layers))}
    layer_sets |= {f"layer{i}": [i] for i in range(num_layers)}
    layer_sets |= {
        "first_half": list(range(num_layers // 2)),
        "second_half": list(range(num_layers // 2, num_layers)),
        "without_0_to_2": list(range(3, num_layers)),
    }
    model = None
    agreement = {}
    for name, layers in layer_sets.items():
        config = VariatorConfig(ratio=args.ratio, task_type="CAUSAL_LM", layers_to_transform=layers)
        if model is None:
            model = get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        model.set_adapter(name)
        predicted = next_token_logits(model, held_out, collator).argmax(-1)
        agreement[name] = 100.0 * float((predicted == reference).float().mean())
        print(f"{name}: {agreement[name]:.1f} %", flush=True)
    report = {
        "command": " ".join(["python", *sys.argv]),
        "settings": vars(args),
        "eval_prompts": held_out.num_rows,
        "agreement_percent_untrained": agreement,
    }
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
