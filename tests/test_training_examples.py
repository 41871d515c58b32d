"""The two training examples run end to end, offline, on the real all-MiniLM-L6-v2 and the bundled tweets, and
stage 2 starts from the plugins stage 1 wrote."""

from __future__ import annotations

import importlib
import os
import re
import sys

import pytest
import torch
from conftest import free_port, run_processes
from safetensors.torch import load_file

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
TINY = ["--max-length", "16", "--batch-size", "8"]


def run_example(name: str, *arguments: str, processes: int = 1) -> str:
    """The example's standard output; with `processes` > 1 it runs under torchrun, on CPU."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={free_port()}"]
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return run_processes([*launcher, os.path.join(EXAMPLES, name), *arguments], env, timeout=300).stdout


def plugin_weights(directory) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(directory, "adapter_model.safetensors"))


def test_pretrained_plugins_are_adapted_to_a_fine_tuned_model(tmp_path):
    pretrained = tmp_path / "pretrained"
    layers = ["1", "2", "3", "4", "5"]  # all-MiniLM-L6-v2's first layer left out, as advised for decoder LLMs
    # Two ratios trained together, with gradient checkpointing.
    stage1 = ["--ratios", "4", "8", "--layers", *layers, "--max-examples", "16", "--gradient-checkpointing", *TINY]
    run_example("pretrain_plugins.py", *stage1, "--output-dir", str(pretrained))
    for ratio in (4, 8):
        weights = plugin_weights(pretrained / f"ratio{ratio}")
        assert weights and all("variator_" in name for name in weights)
        assert {re.search(r"\.layer\.(\d+)\.", name).group(1) for name in weights} == set(layers)
        # Zero-initialised up-projections are nonzero only after training.
        assert all(w.abs().sum() > 0 for name, w in weights.items() if name.endswith("up.weight"))

    adapted = tmp_path / "adapted"
    output = run_example(
        "adapt_plugins.py",
        "--plugins",
        str(pretrained / "ratio4"),
        "--finetune-examples",
        "16",
        "--max-examples",
        "16",
        "--eval-examples",
        "16",
        *TINY,
        "--output-dir",
        str(adapted),
    )
    assert re.search(r"uncompressed accuracy: \d+\.\d\d%", output)
    assert re.search(r"ratio4 \(ratio 4\) accuracy: \d+\.\d\d%", output)
    before, after = plugin_weights(pretrained / "ratio4"), plugin_weights(adapted / "ratio4")
    assert set(before) == set(after)
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_pretraining_under_torchrun_on_cpu_trains_the_processes_as_one_group(tmp_path):
    # A process that trains alone (world size 1, what `TrainingArguments` without `use_cpu` gives on a machine
    # without GPUs) is its own main process and prints the result too.
    arguments = ["--ratios", "4", "--max-examples", "16", *TINY, "--output-dir", str(tmp_path)]
    output = run_example("pretrain_plugins.py", *arguments, processes=2)
    assert output.count("Pre-trained plugins:") == 1
    assert plugin_weights(tmp_path / "ratio4")


@pytest.mark.parametrize(
    ("example", "arguments", "message"),
    [
        ("quickstart", ["--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
        ("quickstart", ["--batch", "0"], "argument --batch: must be >= 1, got 0"),
        ("quickstart", ["--seq-len", "1024"], "--seq-len must be at most 512"),
        ("quickstart", ["--train-examples", "20000"], "--train-examples must be at most 17171"),
        ("quickstart", ["--test-examples", "5000"], "--test-examples must be at most 3816"),
        ("pretrain_plugins", ["--ratios", "4", "1"], "argument --ratios: must be >= 2, got 1"),
        ("pretrain_plugins", ["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        ("pretrain_plugins", ["--lr", "0"], "argument --lr: must be > 0, got 0.0"),
        ("adapt_plugins", ["--max-examples", "-3"], "argument --max-examples: must be >= 1, got -3"),
        ("adapt_plugins", ["--logits-weight", "-1"], "argument --logits-weight: must be >= 0.0, got -1.0"),
        ("adapt_plugins", ["--epochs", "abc"], "argument --epochs: invalid positive value: 'abc'"),
    ],
)
def test_examples_refuse_bad_options_naming_the_option_and_the_limit(example, arguments, message, capsys):
    sys.path.insert(0, EXAMPLES)
    try:
        module = importlib.import_module(example)
    finally:
        sys.path.remove(EXAMPLES)
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(arguments)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
