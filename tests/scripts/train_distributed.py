"""Trains tiny BERT plugins with VariatorTrainer for a few steps; run under `accelerate launch` by
tests/test_distributed.py. Each rank writes its final plugin weights and the first batch it saw to `output_dir`."""

from __future__ import annotations

import argparse
import os
import sys

import torch
from datasets import Dataset
from peft import get_peft_model
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from peft_variator import VariatorConfig
from peft_variator.trainer import VariatorTrainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--ratios", type=int, nargs="+", default=[4])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3
    )
    names = [f"ratio{ratio}" for ratio in args.ratios]
    model = get_peft_model(
        BertForSequenceClassification(config),
        VariatorConfig(ratio=args.ratios[0], adapter_dim=8),
        adapter_name=names[0],
    )
    for name, ratio in zip(names[1:], args.ratios[1:], strict=True):
        model.add_adapter(name, VariatorConfig(ratio=ratio, adapter_dim=8))

    generator = torch.Generator().manual_seed(0)
    rows = []
    for length in torch.randint(5, 20, (64,), generator=generator).tolist():
        ids = torch.randint(1, 100, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": sum(ids) % 3})

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(row["input_ids"]) for row in batch)
        return {
            "input_ids": torch.tensor([r["input_ids"] + [0] * (longest - len(r["input_ids"])) for r in batch]),
            "attention_mask": torch.tensor(
                [[1] * len(r["input_ids"]) + [0] * (longest - len(r["input_ids"])) for r in batch]
            ),
            "labels": torch.tensor([r["labels"] for r in batch]),
        }

    training_args = TrainingArguments(
        args.output_dir,
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    trainer = VariatorTrainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_list(rows),
        data_collator=collate,
        ratios_adapters=names if len(names) > 1 else None,
    )
    first_batch = next(iter(trainer.accelerator.prepare(trainer.get_train_dataloader())))["input_ids"]
    trainer.train()
    rank = trainer.accelerator.process_index
    plugins = {name: p.detach().contiguous() for name, p in model.named_parameters() if "variator_" in name}
    save_file(plugins, os.path.join(args.output_dir, f"rank{rank}.safetensors"))
    save_file({"input_ids": first_batch.contiguous()}, os.path.join(args.output_dir, f"batch{rank}.safetensors"))
    # Done: leave without tearing down gloo. Its teardown at interpreter exit can deadlock (seen here: the destructor
    # of the process group, run by DDP's reducer, joins gloo's worker thread while holding the GIL, and that thread
    # waits for the GIL to free its last work's tensors) or abort when the other rank has already gone.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
