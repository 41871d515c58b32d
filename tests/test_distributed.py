"""Two-process data-parallel training (DDP over gloo, on CPU) with VariatorTrainer under `accelerate launch`.

The ranks see different batches, so they only end with identical plugin weights if DDP averaged the gradients.
`accelerate launch --cpu` starts a single process in accelerate 1.x whatever `--num_processes` says; `--multi_gpu`
starts the two processes through torchrun, and the script's `use_cpu=True` makes them train on CPU over gloo.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from conftest import free_port, run_processes
from safetensors.torch import load_file

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "train_distributed.py")


def launch(output_dir, *script_args: str) -> None:
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        SCRIPT,
        str(output_dir),
        *script_args,
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    run_processes(command, env, timeout=180)


@pytest.mark.parametrize("ratios", [["4"], ["4", "2"]], ids=["one-ratio", "two-ratios"])
def test_both_ranks_end_with_identical_trained_plugin_weights(tmp_path, ratios):
    launch(tmp_path, "--ratios", *ratios)

    first_batches = [load_file(tmp_path / f"batch{rank}.safetensors")["input_ids"] for rank in (0, 1)]
    assert first_batches[0].shape != first_batches[1].shape or not torch.equal(*first_batches)
    rank0, rank1 = (load_file(tmp_path / f"rank{rank}.safetensors") for rank in (0, 1))
    assert set(rank0) == set(rank1)
    assert {name.split(".variator_")[1].split(".")[1] for name in rank0} == {f"ratio{ratio}" for ratio in ratios}
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)
    # The decompression up-projection starts at zero: it is nonzero only if training happened.
    assert all(rank0[name].abs().sum() > 0 for name in rank0 if name.endswith("up.weight"))


def test_two_ratios_with_gradient_checkpointing_train_to_the_weights_of_training_without_it(tmp_path):
    launch(tmp_path / "plain", "--ratios", "4", "2")
    launch(tmp_path / "checkpointed", "--ratios", "4", "2", "--gradient-checkpointing")
    for rank in (0, 1):
        plain = load_file(tmp_path / "plain" / f"rank{rank}.safetensors")
        checkpointed = load_file(tmp_path / "checkpointed" / f"rank{rank}.safetensors")
        assert set(checkpointed) == set(plain)
        for name, value in plain.items():
            torch.testing.assert_close(checkpointed[name], value, msg=name)
