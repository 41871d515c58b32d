"""RatioScheduler: choosing the least compression that fits a latency budget, and running it.

Latencies are never measured for real here: a fake clock advances by a synthetic cost whenever the model runs, so
every figure below is exact.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import randomize_plugins
from peft import get_peft_model
from transformers import AutoModel, BertConfig, BertModel

from peft_variator import VariatorConfig
from peft_variator.layer import VariatorLayer
from peft_variator.scheduler import LatencyModel, RatioScheduler, count_tokens

ADAPTERS = [None, "ratio2", "ratio4", "ratio8"]
# Synthetic cost models (intercept ms, ms per token): fixed cost 10 ms, cheaper tokens with more compression.
COSTS = {None: (10.0, 1.0), "ratio2": (10.0, 0.6), "ratio4": (10.0, 0.4), "ratio8": (10.0, 0.3)}


def with_plugins(base: torch.nn.Module) -> torch.nn.Module:
    model = get_peft_model(base, VariatorConfig(ratio=2, adapter_dim=8), adapter_name="ratio2")
    model.add_adapter("ratio4", VariatorConfig(ratio=4, adapter_dim=8))
    model.add_adapter("ratio8", VariatorConfig(ratio=8, adapter_dim=8))
    randomize_plugins(model)
    return model.eval()


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    return with_plugins(BertModel(config))


def batch_of(rows: int, seq_len: int, padded_row_length: int | None = None) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(1, 100, (rows, seq_len))
    attention_mask = torch.ones_like(input_ids)
    if padded_row_length is not None:
        attention_mask[0, padded_row_length:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class FakeClock:
    """A clock that only moves when told to: by `advance_ms`, or by the model running (see `charge_costs`)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance_ms(self, milliseconds: float) -> None:
        self.now += milliseconds / 1000.0


class PerThreadClock(FakeClock):
    """A fake clock per thread: time passes in a thread only while that thread runs the model, so waiting for the
    lock costs nothing and the choices do not depend on how the threads interleave."""

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def now(self) -> float:
        return getattr(self._local, "now", 0.0)

    @now.setter
    def now(self, value: float) -> None:
        self._local.now = value


def charge_costs(model: torch.nn.Module, clock: FakeClock, costs: dict) -> None:
    """Make every forward pass of `model` advance `clock` by the cost of the plugin that runs."""
    layer = next(module for module in model.modules() if isinstance(module, VariatorLayer))

    def advance(_module, _args, kwargs) -> None:
        intercept, per_token = costs[layer.active_plugin()]
        clock.advance_ms(intercept + per_token * count_tokens(kwargs))

    model.base_model.model.register_forward_pre_hook(advance, with_kwargs=True)


def scheduler_with_costs(model, budget: float = 50.0, **kwargs) -> RatioScheduler:
    scheduler = RatioScheduler(model, ADAPTERS, latency_budget_ms=budget, **kwargs)
    for adapter, (intercept, per_token) in COSTS.items():
        scheduler.set_cost_model(adapter, intercept, per_token)
    return scheduler


def reference_output(model, adapter: str | None, batch: dict) -> torch.Tensor:
    with torch.inference_mode():
        if adapter is None:
            with model.disable_adapter():
                return model(**batch).last_hidden_state
        model.set_adapter(adapter)
        return model(**batch).last_hidden_state


# --- choose ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_tokens", "expected"),
    [
        (30, None),  # 40 ms uncompressed fits 50 ms
        (60, "ratio2"),  # uncompressed 70 ms, ratio2 46 ms
        (100, "ratio4"),  # ratio2 70 ms, ratio4 exactly 50 ms: the budget is inclusive
        (120, "ratio8"),  # ratio4 58 ms, ratio8 46 ms
    ],
)
def test_choose_picks_the_least_compression_that_fits(tiny_model, num_tokens, expected):
    assert scheduler_with_costs(tiny_model).choose(num_tokens) == expected


def test_choose_falls_back_to_the_strongest_compression_when_nothing_fits(tiny_model):
    # ratio8 predicts 310 ms, far over the 50 ms budget, and is still the best there is.
    assert scheduler_with_costs(tiny_model).choose(1000) == "ratio8"


@pytest.mark.parametrize(
    ("queue_delay_ms", "expected"), [(0.0, None), (10.0, None), (15.0, "ratio2"), (25.0, "ratio4"), (35.0, "ratio8")]
)
def test_queue_delay_pushes_towards_more_compression(tiny_model, queue_delay_ms, expected):
    # 30 tokens: uncompressed 40 ms, ratio2 28 ms, ratio4 22 ms, ratio8 19 ms.
    assert scheduler_with_costs(tiny_model).choose(30, queue_delay_ms=queue_delay_ms) == expected


@pytest.mark.parametrize(
    ("backlog_tokens", "expected"), [(0, None), (5, "ratio2"), (20, "ratio2"), (40, "ratio4"), (100, "ratio8")]
)
def test_a_queue_building_up_behind_the_batch_pushes_towards_more_compression(tiny_model, backlog_tokens, expected):
    # 30 tokens now, then the queued ones: their requests wait for this batch and their own, within 50 ms.
    # backlog 5: uncompressed 40 + 15 ms, ratio2 28 + 13 ms. 20: ratio2 28 + 22 ms, exactly the budget.
    # 40: ratio2 28 + 34 ms, ratio4 22 + 26 ms. 100: ratio8 19 + 40 ms misses too, but is the strongest.
    assert scheduler_with_costs(tiny_model).choose(30, backlog_tokens=backlog_tokens) == expected


@pytest.mark.parametrize(
    ("arrival_tokens_per_s", "expected"), [(0.0, None), (900.0, None), (1000.0, "ratio2"), (2000.0, "ratio4")]
)
def test_a_choice_that_cannot_keep_up_with_arrivals_is_passed_over(tiny_model, arrival_tokens_per_s, expected):
    # 30 tokens, no queue: every choice fits the 50 ms budget, but each extra token costs 1 ms uncompressed, 0.6 ms
    # with ratio2, 0.4 ms with ratio4. At 900 tokens/s uncompressed is busy 90% of the time (the limit, inclusive),
    # at 1000 tokens/s 100% (ratio2 60%), at 2000 tokens/s ratio2 120% (ratio4 80%).
    scheduler = scheduler_with_costs(tiny_model)
    assert scheduler.choose(30, arrival_tokens_per_s=arrival_tokens_per_s) == expected


def test_when_no_choice_keeps_up_the_strongest_runs(tiny_model):
    assert scheduler_with_costs(tiny_model).choose(30, arrival_tokens_per_s=10_000.0) == "ratio8"


def record_arrivals(scheduler: RatioScheduler, clock: FakeClock, count: int, tokens: int, every_ms: float) -> None:
    for _ in range(count):
        clock.advance_ms(every_ms)
        scheduler.record_arrival(tokens)


def test_recorded_arrivals_make_a_burst_compress_before_any_queue_builds_up(tiny_model):
    clock = FakeClock()
    scheduler = scheduler_with_costs(tiny_model, clock=clock)
    # Light load: 5 requests of 30 tokens in the last 500 ms, 300 tokens/s: uncompressed is busy 30% of the time.
    record_arrivals(scheduler, clock, count=5, tokens=30, every_ms=100.0)
    assert scheduler.arrival_rate() == pytest.approx(300.0)
    assert scheduler.run(batch_of(1, 30))[1].adapter is None
    # A burst: 15 requests in 150 ms. Within the window (the last 500 ms) that is 19 x 30 tokens, 1140 tokens/s.
    record_arrivals(scheduler, clock, count=15, tokens=30, every_ms=10.0)
    _, decision = scheduler.run(batch_of(1, 30))
    assert decision.queue_delay_ms == 0.0
    assert decision.arrival_tokens_per_s == pytest.approx(1140.0)
    assert decision.adapter == "ratio2"  # uncompressed would be busy 114% of the time, ratio2 68%
    # Once the window has passed without arrivals, the model is idle again.
    clock.advance_ms(600.0)
    assert scheduler.arrival_rate() == 0.0
    assert scheduler.run(batch_of(1, 30))[1].adapter is None


def test_arrivals_are_scaled_by_the_padding_the_batch_carries(tiny_model):
    clock = FakeClock()
    scheduler = scheduler_with_costs(tiny_model, clock=clock)
    record_arrivals(scheduler, clock, count=10, tokens=30, every_ms=10.0)  # 600 real tokens/s
    # 2 rows of 30 positions with 45 real tokens: each arriving token will cost 60/45 positions.
    _, decision = scheduler.run(batch_of(2, 30, padded_row_length=15))
    assert decision.arrival_tokens_per_s == pytest.approx(800.0)


def test_a_lone_request_after_padded_batches_is_still_planned_with_padding(tiny_model):
    clock = FakeClock()
    scheduler = scheduler_with_costs(tiny_model, clock=clock)
    record_arrivals(scheduler, clock, count=10, tokens=30, every_ms=10.0)  # 600 real tokens/s
    for _ in range(20):
        scheduler.run(batch_of(2, 30, padded_row_length=15))  # 4/3 positions per real token
    # One request alone has no padding, but the requests arriving now will be batched (and padded) like the last
    # ones: the rate keeps most of the recent padding.
    _, decision = scheduler.run(batch_of(1, 30))
    assert 600.0 * 1.2 < decision.arrival_tokens_per_s < 800.0


def test_without_recorded_arrivals_only_latencies_decide(tiny_model):
    clock = FakeClock()
    charge_costs(tiny_model, clock, COSTS)
    scheduler = scheduler_with_costs(tiny_model, budget=1000.0, clock=clock)
    # Back-to-back batches keep the model busy all the time, but nothing says requests are waiting for it.
    decisions = [scheduler.run(batch_of(1, 30))[1] for _ in range(20)]
    assert {decision.adapter for decision in decisions} == {None}
    assert scheduler.stats()["arrival_tokens_per_s"] == 0.0


def test_adapters_are_tried_from_least_to_most_compression_whatever_their_order(tiny_model):
    scheduler = RatioScheduler(tiny_model, ["ratio8", None, "ratio4", "ratio2"], latency_budget_ms=50.0)
    assert scheduler.adapters == [None, "ratio2", "ratio4", "ratio8"]
    assert [scheduler.ratio_of(adapter) for adapter in scheduler.adapters] == [1, 2, 4, 8]


def test_only_the_listed_adapters_are_chosen(tiny_model):
    scheduler = RatioScheduler(tiny_model, ["ratio2", "ratio4"], latency_budget_ms=50.0)
    for adapter in ("ratio2", "ratio4"):
        scheduler.set_cost_model(adapter, *COSTS[adapter])
    assert scheduler.choose(10) == "ratio2"  # uncompressed would fit, but is not a choice
    assert scheduler.choose(1000) == "ratio4"


def test_a_new_budget_takes_effect_at_once(tiny_model):
    scheduler = scheduler_with_costs(tiny_model)
    assert scheduler.choose(60) == "ratio2"
    scheduler.latency_budget_ms = 80
    assert scheduler.choose(60) is None


# --- cost models ----------------------------------------------------------------------------------------------------


def test_latency_model_fit_recovers_an_exact_line():
    model = LatencyModel.fit([10, 20, 40, 80], [7.0, 9.0, 13.0, 21.0])
    assert model.intercept_ms == pytest.approx(5.0)
    assert model.per_token_ms == pytest.approx(0.2)
    assert model.predict(100) == pytest.approx(25.0)


def test_latency_model_never_predicts_cheaper_work_for_more_tokens():
    model = LatencyModel.fit([10, 20, 40], [12.0, 11.0, 9.0])
    assert model.per_token_ms == 0.0
    assert model.intercept_ms == pytest.approx(32.0 / 3)


def test_latency_model_with_a_single_token_count_is_proportional():
    model = LatencyModel.fit([50, 50, 50], [10.0, 10.0, 10.0])
    assert model.intercept_ms == 0.0
    assert model.predict(100) == pytest.approx(20.0)


def test_online_updates_follow_a_slower_machine():
    model = LatencyModel.fit([10, 100], [10.0, 100.0], smoothing=0.2)
    for _ in range(50):
        model.update(50, 100.0)  # twice the calibrated 50 ms
    assert model.scale == pytest.approx(2.0, rel=1e-3)
    # The calibrated shape is kept: twice the tokens, twice the cost.
    assert model.predict(100) == pytest.approx(200.0, rel=1e-3)


def test_one_stray_slow_batch_moves_the_prediction_only_a_little():
    model = LatencyModel.fit([10, 100], [10.0, 100.0], smoothing=0.2)
    model.update(50, 50_000.0)  # a 1000x outlier, e.g. the process was swapped out
    # The surprise is capped at 4x, and weighted 0.2: 1 + 0.2 * (4 - 1).
    assert model.predict(50) == pytest.approx(50.0 * 1.6)


def test_calibrate_fits_each_adapters_cost_and_costs_fall_with_compression(tiny_model):
    clock = FakeClock()
    charge_costs(tiny_model, clock, COSTS)
    scheduler = RatioScheduler(tiny_model, ADAPTERS, latency_budget_ms=50.0, clock=clock)
    fitted = scheduler.calibrate(batch_of(8, 32, padded_row_length=20), repeats=2)
    assert set(fitted) == set(ADAPTERS)
    for adapter, (intercept, per_token) in COSTS.items():
        assert fitted[adapter].intercept_ms == pytest.approx(intercept)
        assert fitted[adapter].per_token_ms == pytest.approx(per_token)
    predicted = [scheduler.predict(adapter, 200) for adapter in scheduler.adapters]
    assert predicted == sorted(predicted, reverse=True)
    assert scheduler.choose(30) is None and scheduler.choose(120) == "ratio8"


def test_calibrate_cuts_a_left_padded_batch_from_the_end_its_tokens_are_at(tiny_model):
    clock = FakeClock()
    charge_costs(tiny_model, clock, COSTS)
    scheduler = RatioScheduler(tiny_model, ADAPTERS, latency_budget_ms=50.0, clock=clock)
    batch = batch_of(8, 32)
    batch["attention_mask"][:, :20] = 0  # a decoder's prompts: padding on the left, 12 real tokens each
    fitted = scheduler.calibrate(batch, fractions=(0.25, 0.5), repeats=1)
    for adapter, (intercept, per_token) in COSTS.items():
        assert fitted[adapter].intercept_ms == pytest.approx(intercept)
        assert fitted[adapter].per_token_ms == pytest.approx(per_token)


def test_calibrate_says_which_arguments_left_it_nothing_to_time(tiny_model):
    scheduler = RatioScheduler(tiny_model, ADAPTERS, latency_budget_ms=50.0)
    batch = batch_of(2, 32)
    batch["attention_mask"][0, :28] = 0  # padded on the left, the next row on the right: cut from the start, the
    batch["attention_mask"][1, 4:] = 0  # first row keeps no token in any sub-batch `fractions` asks for
    with pytest.raises(ValueError, match="`fractions`"):
        scheduler.calibrate(batch, fractions=(0.25, 0.5), repeats=1)


def test_calibrate_leaves_the_model_as_it_was(tiny_model):
    tiny_model.set_adapter("ratio4")
    batch = batch_of(2, 16)
    before = reference_output(tiny_model, "ratio4", batch)
    scheduler = RatioScheduler(tiny_model, ADAPTERS, latency_budget_ms=50.0)
    scheduler.calibrate(batch_of(4, 16), fractions=(0.5, 1.0), repeats=1)
    assert tiny_model.active_adapter == "ratio4"
    assert not tiny_model.base_model.model.training
    assert torch.equal(reference_output(tiny_model, "ratio4", batch), before)


# --- running batches ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "expected"), [(250.0, None), (150.0, "ratio2"), (100.0, "ratio4"), (1.0, "ratio8")]
)
def test_call_runs_the_chosen_adapter(tiny_model, budget, expected):
    # 2 x 100 positions: uncompressed 210 ms, ratio2 130 ms, ratio4 90 ms, ratio8 70 ms.
    batch = batch_of(2, 100, padded_row_length=60)
    scheduler = scheduler_with_costs(tiny_model, budget=budget)
    output, decision = scheduler.run(batch)
    assert decision.adapter == expected
    assert decision.num_tokens == 200
    assert torch.equal(output.last_hidden_state, reference_output(tiny_model, expected, batch))


def test_an_uncompressed_batch_leaves_the_plugins_on_for_the_next_one(tiny_model):
    batch = batch_of(2, 24)
    ratio4 = reference_output(tiny_model, "ratio4", batch)
    scheduler = scheduler_with_costs(tiny_model, budget=1000.0)
    _, decision = scheduler.run(batch)
    assert decision.adapter is None
    with torch.inference_mode():
        assert torch.equal(tiny_model(**batch).last_hidden_state, ratio4)


def test_call_outputs_differ_between_adapters(tiny_model):
    # Guards the test above: if every adapter gave the same output, it could not tell them apart.
    batch = batch_of(2, 24)
    outputs = [reference_output(tiny_model, adapter, batch) for adapter in ADAPTERS]
    for i in range(len(outputs)):
        for j in range(i + 1, len(outputs)):
            assert not torch.allclose(outputs[i], outputs[j])


def test_call_returns_what_the_model_returns(tiny_model):
    batch = batch_of(3, 12)
    scheduler = scheduler_with_costs(tiny_model, budget=1000.0)
    output = scheduler(**batch)
    assert torch.equal(output.last_hidden_state, reference_output(tiny_model, None, batch))


def test_call_records_stats_and_budget_misses(tiny_model):
    clock = FakeClock()
    charge_costs(tiny_model, clock, COSTS)
    scheduler = scheduler_with_costs(tiny_model, budget=50.0, clock=clock)
    scheduler.run(batch_of(1, 30))  # uncompressed, 40 ms
    scheduler.run(batch_of(2, 30))  # 60 tokens: ratio2, 46 ms
    scheduler.run(batch_of(1, 30), queue_delay_ms=25.0)  # ratio4, 25 + 22 ms
    scheduler.run(batch_of(4, 250))  # 1000 tokens: ratio8, 310 ms, a miss
    stats = scheduler.stats()
    assert stats["batches"] == 4 and stats["sequences"] == 8
    assert stats["budget_misses"] == 1
    assert {name: entry["batches"] for name, entry in stats["adapters"].items()} == {
        "uncompressed": 1,
        "ratio2": 1,
        "ratio4": 1,
        "ratio8": 1,
    }
    assert stats["adapters"]["ratio8"]["sequences"] == 4
    assert stats["adapters"]["ratio4"]["p50_ms"] == pytest.approx(47.0)
    assert stats["p50_ms"] == pytest.approx(46.0)
    assert stats["p95_ms"] == pytest.approx(310.0)
    scheduler.reset_stats()
    assert scheduler.stats()["batches"] == 0 and scheduler.stats()["p95_ms"] is None


def test_observed_latency_refines_the_cost_model(tiny_model):
    clock = FakeClock()
    # The machine turns out twice as slow uncompressed as the cost model says.
    charge_costs(tiny_model, clock, {**COSTS, None: (20.0, 2.0)})
    scheduler = scheduler_with_costs(tiny_model, budget=1000.0, clock=clock)
    for _ in range(30):
        _, decision = scheduler.run(batch_of(1, 20))
        assert decision.latency_ms == pytest.approx(60.0)
    assert scheduler.predict(None, 20) == pytest.approx(60.0, rel=0.05)


def test_a_slowdown_seen_on_one_adapter_is_expected_of_all(tiny_model):
    clock = FakeClock()
    # Another process now shares the cores: everything runs twice as slow as calibrated.
    charge_costs(tiny_model, clock, {adapter: (2 * a, 2 * b) for adapter, (a, b) in COSTS.items()})
    scheduler = scheduler_with_costs(tiny_model, budget=1.0, clock=clock)  # nothing fits: ratio8 runs
    for _ in range(30):
        assert scheduler.run(batch_of(1, 20))[1].adapter == "ratio8"
    # ratio4 was never run again, but it must not look as fast as before, or the server would switch to it.
    assert scheduler.predict("ratio4", 20) == pytest.approx(2 * (10.0 + 0.4 * 20), rel=0.05)


def test_the_wait_for_the_lock_counts_as_queue_delay(tiny_model):
    clock = FakeClock()
    arrived = threading.Event()
    lock = threading.Lock()

    def clock_that_signals() -> float:
        arrived.set()
        return clock()

    scheduler = scheduler_with_costs(tiny_model, budget=50.0, clock=clock_that_signals, lock=lock)
    decisions = []
    with lock:
        worker = threading.Thread(target=lambda: decisions.append(scheduler.run(batch_of(1, 30), 5.0)[1]))
        worker.start()
        assert arrived.wait(timeout=30)
        clock.advance_ms(12.0)  # another model holds the device for 12 ms
    worker.join(timeout=60)
    # 5 + 12 ms waited: uncompressed (40 ms) no longer fits, ratio2 (28 ms) does.
    assert decisions[0].queue_delay_ms == pytest.approx(17.0)
    assert decisions[0].adapter == "ratio2"


def test_concurrent_threads_get_correct_outputs_and_consistent_counts(tiny_model):
    clock = PerThreadClock()
    charge_costs(tiny_model, clock, COSTS)
    scheduler = scheduler_with_costs(tiny_model, budget=45.0, clock=clock)
    batches = [batch_of(1 + i % 4, 8 + 8 * (i % 5), padded_row_length=5) for i in range(24)]
    expected_adapters = [scheduler.choose(count_tokens(batch)) for batch in batches]
    assert set(expected_adapters) == set(ADAPTERS)  # the sizes span every choice, so threads really switch adapters
    references = [
        reference_output(tiny_model, adapter, batch) for adapter, batch in zip(expected_adapters, batches, strict=True)
    ]
    inside, most_inside = [0], [0]
    counter_lock = threading.Lock()

    def count_concurrent_forwards(_module, _args, _kwargs) -> None:
        with counter_lock:
            inside[0] += 1
            most_inside[0] = max(most_inside[0], inside[0])

    def leave(_module, _args, _kwargs, _output) -> None:
        with counter_lock:
            inside[0] -= 1

    tiny_model.base_model.model.register_forward_pre_hook(count_concurrent_forwards, with_kwargs=True)
    tiny_model.base_model.model.register_forward_hook(leave, with_kwargs=True)
    results = {}
    errors = []

    def serve(indices: range) -> None:
        try:
            for i in indices:
                results[i] = scheduler.run(batches[i])
        except Exception as error:  # noqa: BLE001  (re-raised in the main thread below)
            errors.append(error)

    threads = [threading.Thread(target=serve, args=(range(start, 24, 4),)) for start in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert most_inside[0] == 1  # switch + run never interleave
    assert sorted(results) == list(range(24))
    for i, (output, decision) in results.items():
        assert decision.adapter == expected_adapters[i]
        assert torch.equal(output.last_hidden_state, references[i])
    stats = scheduler.stats()
    assert stats["batches"] == 24
    assert stats["sequences"] == sum(batch["input_ids"].shape[0] for batch in batches)
    for adapter in ADAPTERS:
        label = "uncompressed" if adapter is None else adapter
        assert stats["adapters"][label]["batches"] == expected_adapters.count(adapter)


def test_real_minilm_runs_each_chosen_adapter(minilm_path):
    model = with_plugins(AutoModel.from_pretrained(minilm_path))
    batch = {"input_ids": torch.randint(1000, 20000, (2, 40)), "attention_mask": torch.ones(2, 40, dtype=torch.long)}
    batch["attention_mask"][1, 25:] = 0
    clock = FakeClock()
    charge_costs(model, clock, COSTS)
    scheduler = RatioScheduler(model, ADAPTERS, latency_budget_ms=50.0, clock=clock)
    scheduler.calibrate(batch, fractions=(0.5, 1.0), repeats=1)
    for budget, expected in [(100.0, None), (60.0, "ratio2"), (45.0, "ratio4"), (1.0, "ratio8")]:
        scheduler.latency_budget_ms = budget
        output, decision = scheduler.run(batch)
        assert decision.adapter == expected
        assert torch.equal(output.last_hidden_state, reference_output(model, expected, batch))


# --- errors ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0, -5.0, float("nan"), float("inf"), "fast", None, True])
def test_a_bad_latency_budget_is_refused_by_name(tiny_model, budget):
    with pytest.raises(ValueError, match="latency_budget_ms"):
        RatioScheduler(tiny_model, ADAPTERS, latency_budget_ms=budget)
    scheduler = RatioScheduler(tiny_model, ADAPTERS, latency_budget_ms=10.0)
    with pytest.raises(ValueError, match="latency_budget_ms"):
        scheduler.latency_budget_ms = budget
    assert scheduler.latency_budget_ms == 10.0


def test_an_adapter_the_model_does_not_carry_is_refused(tiny_model):
    with pytest.raises(ValueError, match=r"'ratio16'.*not loaded.*\['ratio2', 'ratio4', 'ratio8'\]"):
        RatioScheduler(tiny_model, [None, "ratio16"])


@pytest.mark.parametrize("adapters", [[], "ratio2", [None, None], ["ratio2", "ratio2"]])
def test_a_malformed_adapter_list_is_refused(tiny_model, adapters):
    with pytest.raises(ValueError, match="adapters"):
        RatioScheduler(tiny_model, adapters)


def test_a_model_without_plugins_is_refused():
    with pytest.raises(ValueError, match="PeftModel"):
        RatioScheduler(torch.nn.Linear(2, 2), [None])


def test_choosing_before_calibration_says_what_to_do(tiny_model):
    scheduler = RatioScheduler(tiny_model, ADAPTERS)
    with pytest.raises(RuntimeError, match="calibrate"):
        scheduler.choose(10)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_tokens": -1}, "num_tokens"),
        ({"num_tokens": 2.5}, "num_tokens"),
        ({"queue_delay_ms": -1.0}, "queue_delay_ms"),
        ({"backlog_tokens": -3}, "backlog_tokens"),
        ({"arrival_tokens_per_s": -1.0}, "arrival_tokens_per_s"),
    ],
)
def test_bad_choose_arguments_are_refused_by_name(tiny_model, kwargs, name):
    arguments = {"num_tokens": 10, **kwargs}
    with pytest.raises(ValueError, match=name):
        scheduler_with_costs(tiny_model).choose(**arguments)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"max_utilization": 0.0}, "max_utilization"), ({"load_window_ms": -5.0}, "load_window_ms")],
)
def test_bad_load_settings_are_refused_by_name(tiny_model, kwargs, name):
    with pytest.raises(ValueError, match=name):
        RatioScheduler(tiny_model, ADAPTERS, **kwargs)


def test_a_new_utilization_limit_takes_effect_at_once_and_is_checked(tiny_model):
    scheduler = scheduler_with_costs(tiny_model)
    assert scheduler.choose(30, arrival_tokens_per_s=1000.0) == "ratio2"
    scheduler.max_utilization = 1.0
    assert scheduler.choose(30, arrival_tokens_per_s=1000.0) is None
    with pytest.raises(ValueError, match="max_utilization"):
        scheduler.max_utilization = -0.5
    assert scheduler.max_utilization == 1.0


@pytest.mark.parametrize("num_tokens", [-1, 2.5, None])
def test_a_bad_arrival_is_refused_by_name(tiny_model, num_tokens):
    with pytest.raises(ValueError, match="num_tokens"):
        scheduler_with_costs(tiny_model).record_arrival(num_tokens)


def test_padding_counts_as_tokens_because_the_model_computes_it():
    batch = batch_of(3, 10, padded_row_length=2)
    assert count_tokens(batch) == 30
    assert count_tokens({"attention_mask": batch["attention_mask"]}) == 30


def test_a_batch_without_tokens_is_refused(tiny_model):
    with pytest.raises(ValueError, match="input_ids.*attention_mask"):
        scheduler_with_costs(tiny_model)(inputs_embeds=torch.zeros(1, 4, 32))


def test_set_cost_model_refuses_an_adapter_not_scheduled(tiny_model):
    scheduler = RatioScheduler(tiny_model, [None, "ratio4"])
    with pytest.raises(ValueError, match="ratio8"):
        scheduler.set_cost_model("ratio8", 1.0, 1.0)


def test_running_uncompressed_leaves_the_users_disable_adapter_block_disabled(tiny_model):
    scheduler = RatioScheduler(tiny_model, [None, "ratio8"], latency_budget_ms=1e9)
    for adapter in scheduler.adapters:
        scheduler.set_cost_model(adapter, 1.0, 0.01)
    batch = batch_of(2, 16)
    with torch.inference_mode(), tiny_model.disable_adapter():
        base = tiny_model(**batch).last_hidden_state
        assert scheduler.run(batch)[1].adapter is None
        torch.testing.assert_close(tiny_model(**batch).last_hidden_state, base, rtol=0, atol=0)


def test_a_compressed_choice_inside_a_disable_adapter_block_is_refused_not_run_as_the_base_model(tiny_model):
    scheduler = RatioScheduler(tiny_model, ["ratio8"], latency_budget_ms=1e9)
    scheduler.set_cost_model("ratio8", 1.0, 0.01)
    with tiny_model.disable_adapter(), pytest.raises(RuntimeError, match="adapters are disabled"):
        scheduler.run(batch_of(2, 16))


def test_serving_keeps_adapters_loaded_for_inference_frozen(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(BertModel(config), tmp_path / "ratio2", adapter_name="ratio2")
    loaded.load_adapter(tmp_path / "ratio8", adapter_name="ratio8")
    assert not any(parameter.requires_grad for parameter in loaded.parameters())
    scheduler = RatioScheduler(loaded, [None, "ratio2", "ratio8"], latency_budget_ms=1e9)
    scheduler.calibrate(batch_of(2, 8), fractions=(1.0,), repeats=1)
    for budget in (1e9, 1e-6):  # uncompressed, then ratio8
        scheduler.latency_budget_ms = budget
        scheduler.run(batch_of(2, 8))
    assert loaded.active_adapter == "ratio8"
    assert not any(parameter.requires_grad for parameter in loaded.parameters())


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"smoothing": 0.0}, "`smoothing` must be a number in \\(0, 1\\]"),
        ({"history": -1}, "`history` must be a non-negative integer"),
        ({"adapters": [None, ["ratio2"]]}, "`adapters` must hold adapter names"),
    ],
)
def test_bad_scheduler_settings_are_refused_when_it_is_built(tiny_model, keywords, message):
    with pytest.raises(ValueError, match=message):
        RatioScheduler(tiny_model, **{"adapters": ADAPTERS, **keywords})


def test_uncompressed_runs_the_base_models_head_whatever_adapter_ran_before():
    # Each adapter trains its own copy of the head (`modules_to_save`); uncompressed is the base model, head included.
    from transformers import BertForSequenceClassification

    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    model = get_peft_model(
        BertForSequenceClassification(config),
        VariatorConfig(ratio=2, adapter_dim=8, modules_to_save=["classifier"]),
        adapter_name="ratio2",
    )
    model.add_adapter("ratio4", VariatorConfig(ratio=4, adapter_dim=8, modules_to_save=["classifier"]))
    for name, parameter in model.named_parameters():
        if "modules_to_save" in name:
            torch.nn.init.normal_(parameter, std=1.0)
    model.eval()
    batch = batch_of(2, 12)
    with torch.no_grad(), model.disable_adapter():
        base = model(**batch).logits
    scheduler = RatioScheduler(model, [None, "ratio2", "ratio4"], latency_budget_ms=1e9)
    scheduler.calibrate(batch, fractions=(1.0,), repeats=1)
    for compressed in ("ratio2", "ratio4"):
        scheduler.latency_budget_ms = 1e-6
        assert scheduler.run(batch)[1].adapter == "ratio4"
        model.set_adapter(compressed)
        scheduler.latency_budget_ms = 1e9
        output, decision = scheduler.run(batch)
        assert decision.adapter is None
        torch.testing.assert_close(output.logits, base, rtol=0, atol=0)
