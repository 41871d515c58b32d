"""The serving example (examples/serve.py): endpoints, micro-batching, ratio scheduling and request errors.

The app runs in-process through FastAPI's TestClient (no sockets). Which ratio serves a request is forced through the
latency budget and the utilization limit (huge: uncompressed; tiny budget: the strongest ratio), so no assertion
depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_plugins
from fastapi.testclient import TestClient
from peft import LoraConfig, get_peft_model
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from peft_variator import VariatorConfig

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples"))
import serve  # noqa: E402

TEXTS = [
    "Variator compresses tokens before the feed-forward network.",
    "Short one.",
    "A server under a burst of requests switches to stronger compression to keep its latency budget.",
]


@pytest.fixture(scope="module")
def service(minilm_path) -> serve.Service:
    return serve.build_service(
        model_path=minilm_path, max_batch_size=4, max_wait_ms=2.0, calibration_tokens=4, calibration_repeats=1
    )


@pytest.fixture
def client(service):
    for text_model in (service.embedder, service.classifier):
        # Everything fits, however slow the machine is just now and however fast the test sends: uncompressed.
        text_model.scheduler.latency_budget_ms = 1e9
        text_model.scheduler.max_utilization = 1e9
    with TestClient(serve.create_app(service)) as test_client:
        assert test_client.post("/stats/reset").status_code == 200
        yield test_client


def force_strongest(service: serve.Service) -> None:
    for text_model in (service.embedder, service.classifier):
        text_model.scheduler.latency_budget_ms = 1e-6  # nothing fits: ratio8


def embed_directly(service: serve.Service, adapter: str, texts: list[str]) -> torch.Tensor:
    text_model = service.embedder
    batch = text_model.tokenize(texts)
    with torch.inference_mode():
        text_model.model.set_adapter(adapter)
        hidden = text_model.model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


# --- /embed ---------------------------------------------------------------------------------------------------------


def test_embed_uncompressed_matches_sentence_transformers(client, minilm_path):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(minilm_path, device="cpu").encode(TEXTS, convert_to_tensor=True)
    for text, expected in zip(TEXTS, reference, strict=True):
        response = client.post("/embed", json={"text": text})
        assert response.status_code == 200
        body = response.json()
        assert body["adapter"] == "uncompressed" and body["ratio"] == 1
        embedding = torch.tensor(body["embedding"])
        assert embedding.shape == (384,)
        torch.testing.assert_close(embedding, expected, atol=1e-5, rtol=1e-4)


def test_embed_under_a_tight_budget_runs_ratio8_and_matches_running_it_directly(client, service):
    force_strongest(service)
    response = client.post("/embed", json={"texts": TEXTS})
    assert response.status_code == 200
    results = response.json()["results"]
    assert [result["adapter"] for result in results] == ["ratio8"] * 3
    assert [result["ratio"] for result in results] == [8] * 3
    expected = embed_directly(service, "ratio8", TEXTS)
    torch.testing.assert_close(torch.tensor([result["embedding"] for result in results]), expected, atol=1e-5, rtol=0)


def test_embeddings_are_unit_length(client):
    results = client.post("/embed", json={"texts": TEXTS}).json()["results"]
    norms = torch.tensor([result["embedding"] for result in results]).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones(3))


@pytest.mark.parametrize("strongest", [False, True])
def test_a_text_gets_the_same_embedding_alone_or_padded_in_a_batch(client, service, strongest):
    if strongest:
        force_strongest(service)
    together = [result["embedding"] for result in client.post("/embed", json={"texts": TEXTS}).json()["results"]]
    alone = [client.post("/embed", json={"text": text}).json()["embedding"] for text in TEXTS]
    torch.testing.assert_close(torch.tensor(together), torch.tensor(alone), atol=1e-5, rtol=0)


# --- /classify ------------------------------------------------------------------------------------------------------


def test_classify_returns_a_distribution_and_says_the_default_head_is_untrained(client):
    body = client.post("/classify", json={"text": TEXTS[0]}).json()
    assert body["trained"] is False and "untrained" in body["note"]
    assert set(body["scores"]) == {"LABEL_0", "LABEL_1", "LABEL_2"}
    assert sum(body["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    assert body["label"] == max(body["scores"], key=body["scores"].get)


def test_classify_lists_results_in_request_order(client, service):
    results = client.post("/classify", json={"texts": TEXTS}).json()["results"]
    batch = service.classifier.tokenize(TEXTS)
    with torch.inference_mode(), service.classifier.model.disable_adapter():
        expected = service.classifier.model(**batch).logits.softmax(-1)
    got = torch.tensor([list(result["scores"].values()) for result in results])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# --- /stats and batching --------------------------------------------------------------------------------------------


def test_stats_count_every_text_and_the_ratio_that_served_it(client, service):
    client.post("/embed", json={"texts": TEXTS})
    force_strongest(service)
    client.post("/embed", json={"text": TEXTS[0]})
    stats = client.get("/stats").json()["embed"]
    assert stats["scheduler"]["sequences"] == 4
    assert stats["scheduler"]["adapters"]["uncompressed"]["sequences"] == 3
    assert stats["scheduler"]["adapters"]["ratio8"]["sequences"] == 1
    assert stats["batching"]["texts"] == 4
    assert stats["scheduler"]["budget_misses"] >= 1  # a 1e-6 ms budget cannot be kept
    assert client.get("/stats").json()["classify"]["scheduler"]["sequences"] == 0


def test_every_request_is_reported_to_the_scheduler_as_it_arrives(client, service, monkeypatch):
    arrivals = []
    monkeypatch.setattr(service.embedder.scheduler, "record_arrival", arrivals.append)
    client.post("/embed", json={"texts": TEXTS})
    client.post("/embed", json={"text": TEXTS[1]})
    tokens = [service.embedder.count_tokens(text) for text in TEXTS]
    assert arrivals == [sum(tokens), tokens[1]]


def test_concurrent_requests_all_get_their_own_answer(client):
    expected = {text: client.post("/embed", json={"text": text}).json()["embedding"] for text in TEXTS}
    answers: dict[int, tuple[str, list[float]]] = {}

    def ask(index: int) -> None:
        text = TEXTS[index % 3]
        answers[index] = (text, client.post("/embed", json={"text": text}).json()["embedding"])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(answers) == 12
    for text, embedding in answers.values():
        torch.testing.assert_close(torch.tensor(embedding), torch.tensor(expected[text]), atol=1e-5, rtol=0)


def recording_batcher(max_batch_size: int, max_wait_ms: float, gate: threading.Event | None = None):
    """A batcher whose "model" upper-cases texts and records each batch and the backlog it was told about."""
    seen: list[list[str]] = []
    backlogs: list[int] = []

    def run_batch(texts: list[str], queue_delay_ms: float, backlog: int):
        if gate is not None and not seen:
            gate.wait(timeout=60)
        seen.append(list(texts))
        backlogs.append(backlog)
        return [text.upper() for text in texts], queue_delay_ms

    batcher = serve.MicroBatcher(run_batch, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)
    batcher.backlogs = backlogs
    return batcher, seen


def test_a_full_batch_runs_without_waiting_for_more():
    # An hour's wait: the batches can only have run because they were full.
    batcher, seen = recording_batcher(max_batch_size=4, max_wait_ms=3_600_000)

    async def scenario():
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit([f"t{i}"]) for i in range(8)))
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    assert seen == [["t0", "t1", "t2", "t3"], ["t4", "t5", "t6", "t7"]]
    assert batcher.backlogs == [4, 0]  # the first batch is told that four texts wait behind it
    assert [result[0][0] for result in results] == [f"T{i}" for i in range(8)]


def test_requests_arriving_while_a_batch_runs_form_the_next_batch():
    gate = threading.Event()
    batcher, seen = recording_batcher(max_batch_size=8, max_wait_ms=0.0, gate=gate)

    async def scenario():
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit(["a"]))
        while not batcher.batches:  # the worker has taken "a" and is running it
            await asyncio.sleep(0.001)
        later = asyncio.ensure_future(asyncio.gather(*(batcher.submit([text]) for text in "bcd")))
        await asyncio.sleep(0)
        gate.set()
        await first, await later
        await batcher.stop()

    asyncio.run(scenario())
    assert seen == [["a"], ["b", "c", "d"]]


def test_a_failing_batch_fails_its_requests_and_the_batcher_keeps_serving():
    calls = []

    def run_batch(texts, queue_delay_ms, backlog):
        calls.append(texts)
        if len(calls) == 1:
            raise ValueError("model exploded")
        return list(texts), None

    batcher = serve.MicroBatcher(run_batch, max_batch_size=2, max_wait_ms=3_600_000)

    async def scenario():
        await batcher.start()
        with pytest.raises(ValueError, match="exploded"):
            await batcher.submit(["x", "y"])
        result = await batcher.submit(["z", "w"])
        await batcher.stop()
        return result

    assert [text for text, _ in asyncio.run(scenario())] == ["z", "w"]


def test_stopping_fails_the_running_the_queued_and_every_later_request():
    started, release = threading.Event(), threading.Event()

    def run_batch(texts, queue_delay_ms, backlog):
        started.set()
        release.wait(timeout=60)
        return list(texts), None

    batcher = serve.MicroBatcher(run_batch, max_batch_size=1, max_wait_ms=0.0)

    async def scenario():
        await batcher.start()
        running = asyncio.ensure_future(batcher.submit(["running"]))
        while not started.is_set():
            await asyncio.sleep(0.001)
        queued = asyncio.ensure_future(batcher.submit(["queued"]))
        await asyncio.sleep(0)
        await batcher.stop()
        release.set()
        outcomes = await asyncio.gather(running, queued, return_exceptions=True)
        with pytest.raises(serve.BatcherStopped, match="not running"):
            await batcher.submit(["later"])
        return outcomes

    outcomes = asyncio.wait_for(scenario(), timeout=60)
    assert [type(outcome) for outcome in asyncio.run(outcomes)] == [serve.BatcherStopped, serve.BatcherStopped]


def test_a_max_tokens_beyond_the_models_positions_is_refused_at_startup(minilm_path):
    # all-MiniLM-L6-v2 takes 512 positions: a longer request would fail its whole batch in the model.
    with pytest.raises(SystemExit, match="--max-tokens 600 is more than the model takes \\(512 tokens\\)"):
        serve.build_service(model_path=minilm_path, max_tokens=600, max_batch_size=2, calibration_repeats=1)


# --- bad requests ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"text": ""}, 422, "empty"),
        ({"text": "   \n"}, 422, "empty"),
        ({"texts": ["fine", ""]}, 422, r'"texts"\[1\] is empty'),
        ({"texts": []}, 422, "at least one"),
        ({}, 422, "exactly one"),
        ({"text": "a", "texts": ["b"]}, 422, "exactly one"),
        ({"text": 5}, 422, "text: Input should be a valid string"),
        ({"texts": "not a list"}, 422, "texts: Input should be a valid list"),
        ({"txt": "typo"}, 422, "txt: Extra inputs are not permitted"),
        ({"text": "word " * 300}, 413, "longer than 256 tokens"),
        ({"text": " " * 13_000 + "hello"}, 413, "longer than 12800 characters"),
        ({"texts": ["x"] * 65}, 413, "at most 64"),
    ],
)
@pytest.mark.parametrize("endpoint", ["/embed", "/classify"])
def test_bad_requests_get_a_4xx_that_says_what_is_wrong(client, endpoint, body, status, message):
    response = client.post(endpoint, json=body)
    assert response.status_code == status
    detail = response.json()["detail"]
    assert isinstance(detail, str)  # one readable message, not pydantic's list of error records
    assert re.search(message, detail), detail


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"just a string"', b""])
def test_a_body_that_is_not_a_json_object_gets_a_422(client, raw):
    response = client.post("/embed", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert '{"text": "..."}' in response.json()["detail"]


def test_a_lone_surrogate_in_valid_json_gets_a_422_naming_the_text(client):
    raw = b'{"texts": ["fine", "\\udc80"]}'  # valid JSON, but no Unicode text a tokenizer takes
    response = client.post("/embed", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"].startswith('"texts"[1] is not valid Unicode text')


def test_a_body_that_is_not_json_at_all_gets_a_422(client):
    response = client.post("/embed", content=b"hello", headers={"content-type": "text/plain"})
    assert response.status_code == 422
    assert isinstance(response.json()["detail"], str)


def test_bad_requests_never_reach_the_model(client):
    client.post("/embed", json={"text": ""})
    client.post("/embed", json={"text": "word " * 300})
    assert client.get("/stats").json()["embed"]["scheduler"]["batches"] == 0


# --- loading plugins and classifiers --------------------------------------------------------------------------------


def test_plugins_load_from_an_adapters_folder(tmp_path, minilm_path):
    trained = serve.attach_plugins(AutoModel.from_pretrained(minilm_path), None, adapter_dim=8)
    randomize_plugins(trained)
    # PEFT saves each adapter not named "default" in a subfolder of its name: the layout --adapters reads.
    trained.save_pretrained(tmp_path)
    loaded = serve.attach_plugins(AutoModel.from_pretrained(minilm_path), str(tmp_path))
    batch = AutoTokenizer.from_pretrained(minilm_path)(TEXTS, padding=True, return_tensors="pt")
    for name in ("ratio2", "ratio4", "ratio8"):
        trained.set_adapter(name)
        loaded.set_adapter(name)
        with torch.inference_mode():
            torch.testing.assert_close(loaded(**batch).last_hidden_state, trained(**batch).last_hidden_state)


def test_an_adapters_folder_missing_a_ratio_is_refused(tmp_path, minilm_path):
    with pytest.raises(SystemExit, match="ratio2, ratio4, ratio8"):
        serve.attach_plugins(AutoModel.from_pretrained(minilm_path), str(tmp_path))


def test_a_fine_tuned_classifier_folder_is_used_with_its_labels(tmp_path, minilm_path):
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_path, num_labels=2, id2label={0: "negative", 1: "positive"}
    )
    model.save_pretrained(tmp_path)
    loaded, tokenizer_path, trained = serve.load_classifier(str(tmp_path), minilm_path)
    assert trained is True and tokenizer_path == str(tmp_path)
    assert [loaded.config.id2label[i] for i in range(2)] == ["negative", "positive"]
    torch.testing.assert_close(loaded.classifier.weight, model.classifier.weight)


def test_a_lora_classifier_adapter_is_merged_into_its_base(tmp_path, minilm_path):
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    lora = get_peft_model(base, LoraConfig(target_modules=["query", "value"], modules_to_save=["classifier"]))
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.1)
    lora.save_pretrained(tmp_path)
    loaded, _, trained = serve.load_classifier(str(tmp_path), minilm_path)
    batch = AutoTokenizer.from_pretrained(minilm_path)(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        torch.testing.assert_close(loaded(**batch).logits, lora.eval()(**batch).logits, atol=1e-5, rtol=1e-4)
    assert trained is True


def test_a_variator_adapter_is_refused_as_a_classifier(tmp_path, minilm_path):
    plugins = get_peft_model(AutoModelForSequenceClassification.from_pretrained(minilm_path), VariatorConfig(ratio=4))
    plugins.save_pretrained(tmp_path)
    with pytest.raises(SystemExit, match="--classifier-adapters"):
        serve.load_classifier(str(tmp_path), minilm_path)
