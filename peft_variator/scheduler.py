"""Load-aware ratio switching: pick, per batch, the least compression that keeps a latency budget.

One deployed model carries plugins of several ratios (Variator's point: Xiao et al., 2023, Section 1). A serving
loop hands each batch to a `RatioScheduler`, which predicts every adapter's latency from a per-adapter cost model
(`latency = intercept + per_token * tokens`), adds the time the batch already waited, and runs the batch with the
least compression that still fits the budget: uncompressed when the server is idle, stronger ratios under a burst.

A server that also reports its arrivals (`record_arrival`) gets a second guard: a choice that could not keep up with
the tokens arriving (its utilization above `max_utilization`) is passed over even while the queue is still short,
so a burst is met with compression from its first batches instead of once a backlog has already built up.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .layer import VariatorLayer

UNCOMPRESSED = None
"""The adapter name that stands for the base model, run under `disable_adapter()`."""


class LatencyModel:
    """Predicted latency of one adapter: `scale * (intercept_ms + per_token_ms * tokens)`.

    The line is the shape of the cost, fitted once by least squares on calibration runs over a range of token
    counts. `scale` follows the served batches as an exponentially weighted mean of observed / predicted: it tracks
    what changes while serving (another process on the same cores, a slower machine than the calibration saw)
    without refitting a slope from traffic that may sit in a narrow range of batch sizes. A `RatioScheduler` shares
    one scale between all its adapters.

    Args:
        intercept_ms: fixed cost of a batch.
        per_token_ms: cost of each token.
        smoothing: weight of each new observation in `scale`, in (0, 1].
    """

    # One stray observation (a GC pause, a page fault) moves `scale` by at most this factor's share.
    max_surprise = 4.0

    def __init__(self, intercept_ms: float, per_token_ms: float, smoothing: float = 0.2) -> None:
        _check_number("intercept_ms", intercept_ms, minimum=0.0)
        _check_number("per_token_ms", per_token_ms, minimum=0.0)
        _check_smoothing(smoothing)
        self.intercept_ms = float(intercept_ms)
        self.per_token_ms = float(per_token_ms)
        self.smoothing = float(smoothing)
        self.scale = 1.0

    @classmethod
    def fit(cls, tokens: Sequence[float], latencies_ms: Sequence[float], smoothing: float = 0.2) -> LatencyModel:
        """Least-squares line through calibration points `(tokens, latency_ms)`; at least one point."""
        if len(tokens) != len(latencies_ms) or not tokens:
            raise ValueError(
                f"Need the same, non-zero number of token counts and latencies, got {len(tokens)} and "
                f"{len(latencies_ms)}."
            )
        xs = [float(x) for x in tokens]
        ys = [max(float(y), 0.0) for y in latencies_ms]
        n = len(xs)
        mean_x, mean_y = sum(xs) / n, sum(ys) / n
        sxx = sum((x - mean_x) ** 2 for x in xs)
        sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
        if sxx <= 1e-12 * max(mean_x * mean_x, 1.0):
            # A single token count cannot separate fixed from per-token cost: assume cost proportional to the work.
            if mean_x > 0:
                return cls(0.0, mean_y / mean_x, smoothing)
            return cls(mean_y, 0.0, smoothing)
        # More tokens faster is timing noise, never the model: the slope is at least 0.
        slope = max(sxy / sxx, 0.0)
        intercept = mean_y - slope * mean_x
        if intercept < 0.0:
            # A negative fixed cost would promise impossibly fast small batches: refit through the origin.
            sum_xx = sum(x * x for x in xs)
            intercept, slope = 0.0, sum(x * y for x, y in zip(xs, ys, strict=True)) / sum_xx
        return cls(intercept, slope, smoothing)

    def predict(self, tokens: float) -> float:
        """Predicted latency in milliseconds of a batch of `tokens` tokens."""
        return self.scale * (self.intercept_ms + self.per_token_ms * tokens)

    def marginal_ms_per_token(self) -> float:
        """What one more token in a batch costs, in milliseconds."""
        return self.scale * self.per_token_ms

    def update(self, tokens: float, latency_ms: float) -> None:
        """Learn from one observed batch."""
        expected = self.intercept_ms + self.per_token_ms * tokens
        if expected <= 0.0:
            return
        surprise = min(max(latency_ms / expected / self.scale, 1.0 / self.max_surprise), self.max_surprise)
        self.scale += self.smoothing * (surprise * self.scale - self.scale)

    def __repr__(self) -> str:
        return (
            f"LatencyModel(intercept_ms={self.intercept_ms:.3f}, per_token_ms={self.per_token_ms:.5f}, "
            f"scale={self.scale:.3f})"
        )


class ArrivalRate:
    """Tokens arriving per second, counted over a sliding window of `window_ms`.

    Not thread-safe on its own: the scheduler guards it.
    """

    def __init__(self, window_ms: float) -> None:
        _check_number("load_window_ms", window_ms, minimum=0.0, strict=True)
        self.window_s = window_ms / 1000.0
        self._arrivals: deque[tuple[float, int]] = deque()
        self._tokens = 0

    def add(self, at_s: float, num_tokens: int) -> None:
        self._arrivals.append((at_s, num_tokens))
        self._tokens += num_tokens
        self._forget_before(at_s - self.window_s)

    def tokens_per_s(self, now_s: float) -> float:
        self._forget_before(now_s - self.window_s)
        return self._tokens / self.window_s

    def _forget_before(self, start_s: float) -> None:
        while self._arrivals and self._arrivals[0][0] <= start_s:
            self._tokens -= self._arrivals.popleft()[1]


@dataclass(frozen=True)
class Decision:
    """What the scheduler did with one batch.

    Attributes:
        adapter: the adapter that ran (`None`: uncompressed).
        num_tokens: token positions in the batch, padding included (the cost model's input; see `count_tokens`).
        predicted_ms: the chosen adapter's predicted latency.
        queue_delay_ms: time the batch waited before it ran: the caller's `queue_delay_ms` plus the wait for the
            scheduler's lock.
        latency_ms: observed run time of the model (switching included).
        budget_ms: the latency budget when the batch was scheduled.
        arrival_tokens_per_s: the arrival rate the choice was made for (0 when no arrivals are recorded).
    """

    adapter: str | None
    num_tokens: int
    predicted_ms: float
    queue_delay_ms: float
    latency_ms: float
    budget_ms: float
    arrival_tokens_per_s: float = 0.0

    @property
    def total_ms(self) -> float:
        """Queue delay plus run time: the latency the batch's requests saw."""
        return self.queue_delay_ms + self.latency_ms

    @property
    def missed_budget(self) -> bool:
        return self.total_ms > self.budget_ms


class RatioScheduler:
    """Runs each batch with the least compression whose predicted latency fits a latency budget.

    Args:
        model: a `PeftModel` carrying Variator adapters.
        adapters: the choices, e.g. `[None, "ratio2", "ratio4", "ratio8"]`; `None` runs the base model, adapters
            disabled for that batch as under `model.disable_adapter()`. They are tried from the least to the most
            compression (the adapter's `ratio`, `None` counting as 1), whatever their order here.
        latency_budget_ms: the end-to-end budget of a batch (queue delay + run time), in milliseconds.
        clock: returns seconds; `time.perf_counter` unless a test injects its own.
        lock: the lock held while switching and running. Pass one lock to the schedulers of several models that
            share a device, so their batches run one at a time and the wait counts as queue delay.
        smoothing: weight of each observed batch in the online refinement of the cost models (see `LatencyModel`).
        history: how many recent batches `stats()` computes percentiles over.
        max_utilization: with arrivals recorded (`record_arrival`), a choice is only taken if it would be busy at
            most this share of the time at the current arrival rate. Below 1 on purpose: a queue served at a
            utilization close to 1 grows long under the randomness of real traffic.
        load_window_ms: the arrival rate is the tokens recorded in this many recent milliseconds.

    The model is one shared object: `__call__` switches adapters and runs under a lock, so several threads may
    serve from the same scheduler. The lock is required, not only tidy: the active adapter is model-wide, so a
    thread switching it would change what another thread's overlapping forward runs (padding masks and the split
    FFN's hand-over are kept per thread and need no lock).
    """

    def __init__(
        self,
        model: nn.Module,
        adapters: Sequence[str | None] = (None, "ratio2", "ratio4", "ratio8"),
        latency_budget_ms: float = 100.0,
        clock: Callable[[], float] = time.perf_counter,
        lock: threading.Lock | threading.RLock | None = None,
        smoothing: float = 0.2,
        history: int = 10_000,
        max_utilization: float = 0.9,
        load_window_ms: float = 500.0,
    ) -> None:
        self.model = model
        self.adapters = _order_by_compression(model, adapters)
        # Any one plugin layer tells whether the model's adapters are enabled: PEFT switches them all together.
        self._plugin_layer = next((module for module in model.modules() if isinstance(module, VariatorLayer)), None)
        if self._plugin_layer is None:
            raise ValueError("`model` carries no Variator plugin layers: wrap it with `get_peft_model` first.")
        self.latency_budget_ms = latency_budget_ms
        self.clock = clock
        _check_smoothing(smoothing)
        _check_count("history", history)
        self.smoothing = smoothing
        self.cost_models: dict[str | None, LatencyModel] = {}
        self._lock = lock if lock is not None else threading.Lock()
        self._stats_lock = threading.Lock()
        self._history: deque[Decision] = deque(maxlen=history)
        self._counts: dict[str | None, int] = {}
        self._sequences: dict[str | None, int] = {}
        self._misses = 0
        self.max_utilization = max_utilization
        self._arrivals = ArrivalRate(load_window_ms)
        self._padding_factor = 1.0

    @property
    def latency_budget_ms(self) -> float:
        return self._latency_budget_ms

    @latency_budget_ms.setter
    def latency_budget_ms(self, value: float) -> None:
        _check_number("latency_budget_ms", value, minimum=0.0, strict=True)
        self._latency_budget_ms = float(value)

    @property
    def max_utilization(self) -> float:
        return self._max_utilization

    @max_utilization.setter
    def max_utilization(self, value: float) -> None:
        _check_number("max_utilization", value, minimum=0.0, strict=True)
        self._max_utilization = float(value)

    def ratio_of(self, adapter: str | None) -> int:
        """Compression ratio of an adapter (1 for `None`, uncompressed)."""
        return 1 if adapter is None else int(self.model.peft_config[adapter].ratio)

    def set_cost_model(self, adapter: str | None, intercept_ms: float, per_token_ms: float) -> None:
        """Set an adapter's cost model directly (e.g. restored from an earlier calibration)."""
        self._check_adapter(adapter)
        self.cost_models[adapter] = LatencyModel(intercept_ms, per_token_ms, smoothing=self.smoothing)

    def calibrate(
        self, batch: Mapping[str, torch.Tensor], fractions: Iterable[float] = (0.25, 0.5, 1.0), repeats: int = 3
    ) -> dict[str | None, LatencyModel]:
        """Measure every adapter on sub-batches of `batch` and fit its cost model.

        The sample is cut into `len(fractions)**2` smaller batches: the first `f` of its rows times the first `g` of
        its columns, for every pair of fractions, so the fit sees a range of token counts in both shapes. Each is
        timed `repeats` times after one warm-up run, and the median is kept, which ignores a stray slow run. The model
        keeps the adapter that was active; serving (`run`, `__call__`) then switches per batch and leaves the last
        choice active.
        """
        fractions = sorted(set(fractions))
        if not fractions or not all(isinstance(f, (int, float)) and 0.0 < f <= 1.0 for f in fractions):
            raise ValueError(f"`fractions` must be numbers in (0, 1], got {fractions!r}.")
        if not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"`repeats` must be an integer >= 1, got {repeats!r}.")
        sub_batches = _sub_batches(batch, fractions)
        fitted = {}
        with self._lock:
            active = self.model.active_adapter
            for adapter in self.adapters:
                tokens, latencies = [], []
                for sub_batch in sub_batches:
                    self._run(adapter, sub_batch)
                    runs = []
                    for _ in range(repeats):
                        start = self.clock()
                        self._run(adapter, sub_batch)
                        runs.append((self.clock() - start) * 1000.0)
                    tokens.append(count_tokens(sub_batch))
                    latencies.append(sorted(runs)[len(runs) // 2])
                fitted[adapter] = LatencyModel.fit(tokens, latencies, smoothing=self.smoothing)
            # A set-up step: the model comes back with the adapter it had (serving switches per batch anyway).
            self._switch_to(active)
            self.cost_models.update(fitted)
        return fitted

    def predict(self, adapter: str | None, num_tokens: int) -> float:
        """Predicted run time in milliseconds of `num_tokens` tokens with `adapter`."""
        self._check_adapter(adapter)
        if adapter not in self.cost_models:
            raise RuntimeError(
                f"No cost model for adapter {adapter!r}: call `calibrate(batch)` (or `set_cost_model`) first."
            )
        return self.cost_models[adapter].predict(num_tokens)

    def choose(
        self,
        num_tokens: int,
        queue_delay_ms: float = 0.0,
        backlog_tokens: int = 0,
        arrival_tokens_per_s: float = 0.0,
    ) -> str | None:
        """The least compression whose predicted latency plus `queue_delay_ms` fits the budget; the strongest
        compression when none fits.

        `backlog_tokens` are queued behind this batch: their requests wait for this batch and then for their own
        run (predicted as one more batch of that size, with the same adapter), and must fit the budget too. That
        makes a burst switch to compression as soon as the queue builds up, not only once its oldest request is late.

        `arrival_tokens_per_s` is the rate at which padded tokens arrive. A choice fits only if it keeps up with
        them: its cost per extra token times that rate, the share of time it would be busy, is at most
        `max_utilization`. The fixed cost per batch is left out: under a load heavy enough for this to matter,
        batches are full and it is spread over many tokens. Without a rate (0), only the latencies decide.
        """
        _check_count("num_tokens", num_tokens)
        _check_count("backlog_tokens", backlog_tokens)
        _check_number("queue_delay_ms", queue_delay_ms, minimum=0.0)
        _check_number("arrival_tokens_per_s", arrival_tokens_per_s, minimum=0.0)
        budget = self.latency_budget_ms
        for adapter in self.adapters:
            run_ms = self.predict(adapter, num_tokens)
            backlog_ms = self.predict(adapter, backlog_tokens) if backlog_tokens else 0.0
            utilization = arrival_tokens_per_s * self.cost_models[adapter].marginal_ms_per_token() / 1000.0
            fits_latency = queue_delay_ms + run_ms <= budget and run_ms + backlog_ms <= budget
            if fits_latency and utilization <= self.max_utilization:
                return adapter
        return self.adapters[-1]

    def record_arrival(self, num_tokens: int) -> None:
        """Tell the scheduler that a request of `num_tokens` real tokens arrived (call it as requests come in,
        before they are batched). Once arrivals are recorded, every choice must also keep up with their rate; see
        `choose` and `max_utilization`."""
        _check_count("num_tokens", num_tokens)
        with self._stats_lock:
            self._arrivals.add(self.clock(), num_tokens)

    def arrival_rate(self, padding_factor: float = 1.0) -> float:
        """Tokens per second recorded by `record_arrival` over the last `load_window_ms`, times `padding_factor`
        (padded / real tokens of the batches they will be served in); 0 when no arrivals are recorded."""
        with self._stats_lock:
            return self._arrivals.tokens_per_s(self.clock()) * padding_factor

    def run(
        self, batch: Mapping[str, Any], queue_delay_ms: float = 0.0, backlog_tokens: int = 0
    ) -> tuple[Any, Decision]:
        """Choose an adapter for `batch` (see `choose`), run the model on it, learn from the observed latency.

        Returns the model's output and the `Decision`. The batch's wait for the lock is added to `queue_delay_ms`:
        under load, waiting is what pushes batches towards more compression.
        """
        _check_number("queue_delay_ms", queue_delay_ms, minimum=0.0)
        _check_count("backlog_tokens", backlog_tokens)
        num_tokens = count_tokens(batch)
        arrived = self.clock()
        with self._lock:
            start = self.clock()
            waited_ms = queue_delay_ms + (start - arrived) * 1000.0
            budget_ms = self.latency_budget_ms
            # Arrivals are counted in real tokens, batches are run (and costed) padded. A batch of one request
            # has no padding, full batches under load have much: the recent batches' mean is the better guess of
            # how the arriving requests will be padded, unless this batch already carries more.
            padding = num_tokens / max(_real_tokens(batch), 1)
            self._padding_factor += self.smoothing * (padding - self._padding_factor)
            arrival_rate = self.arrival_rate(max(padding, self._padding_factor))
            adapter = self.choose(num_tokens, waited_ms, backlog_tokens, arrival_rate)
            predicted_ms = self.cost_models[adapter].predict(num_tokens)
            output = self._run(adapter, batch)
            latency_ms = (self.clock() - start) * 1000.0
            self._learn(adapter, num_tokens, latency_ms)
        decision = Decision(adapter, num_tokens, predicted_ms, waited_ms, latency_ms, budget_ms, arrival_rate)
        self._record(decision, _num_sequences(batch))
        return output, decision

    def __call__(self, *, queue_delay_ms: float = 0.0, backlog_tokens: int = 0, **batch: Any) -> Any:
        """`model(**batch)` with the adapter the scheduler chooses; see `run`."""
        return self.run(batch, queue_delay_ms=queue_delay_ms, backlog_tokens=backlog_tokens)[0]

    def stats(self) -> dict[str, Any]:
        """Batches and sequences per adapter, p50/p95 latencies (queue delay included) and budget misses.

        Percentiles are over the last `history` batches; counts are over all batches since the last `reset_stats`.
        """
        with self._stats_lock:
            decisions = list(self._history)
            counts, sequences, misses = dict(self._counts), dict(self._sequences), self._misses
        per_adapter = {}
        for adapter in self.adapters:
            mine = [d.total_ms for d in decisions if d.adapter == adapter]
            per_adapter[_label(adapter)] = {
                "ratio": self.ratio_of(adapter),
                "batches": counts.get(adapter, 0),
                "sequences": sequences.get(adapter, 0),
                "p50_ms": _percentile(mine, 50),
                "p95_ms": _percentile(mine, 95),
            }
        totals = [d.total_ms for d in decisions]
        return {
            "latency_budget_ms": self.latency_budget_ms,
            "batches": sum(counts.values()),
            "sequences": sum(sequences.values()),
            "budget_misses": misses,
            "arrival_tokens_per_s": self.arrival_rate(),
            "p50_ms": _percentile(totals, 50),
            "p95_ms": _percentile(totals, 95),
            "adapters": per_adapter,
        }

    def reset_stats(self) -> None:
        """Forget the recorded batches (the cost models are kept)."""
        with self._stats_lock:
            self._history.clear()
            self._counts.clear()
            self._sequences.clear()
            self._misses = 0

    def _record(self, decision: Decision, num_sequences: int) -> None:
        with self._stats_lock:
            self._history.append(decision)
            self._counts[decision.adapter] = self._counts.get(decision.adapter, 0) + 1
            self._sequences[decision.adapter] = self._sequences.get(decision.adapter, 0) + num_sequences
            self._misses += decision.missed_budget

    def _run(self, adapter: str | None, batch: Mapping[str, Any]) -> Any:
        enabled = not self._plugin_layer.disable_adapters
        with torch.inference_mode():
            if adapter is None:
                if not enabled:  # the caller's own `disable_adapter()` block
                    return self.model(**batch)
                # The tuner's own switch rather than `PeftModel.disable_adapter()`, which also inspects every layer's
                # status for a warning: 1.6 of the 2.6 ms that an uncompressed all-MiniLM-L6-v2 batch paid to switch.
                # It also switches `modules_to_save` heads to the base model's, as `disable_adapter()` does.
                tuner = self.model.base_model
                tuner.disable_adapter_layers()
                try:
                    return self.model(**batch)
                finally:
                    tuner.enable_adapter_layers()
                    if self.model.peft_config[self.model.active_adapter].inference_mode:
                        self._switch_to(self.model.active_adapter)
            if not enabled:
                raise RuntimeError(
                    f"RatioScheduler chose {adapter!r}, but the model's adapters are disabled (is it called inside "
                    "`with model.disable_adapter():`?). Let the scheduler switch: it runs uncompressed when None is "
                    "among its `adapters`."
                )
            if self.model.active_adapter != adapter:
                self._switch_to(adapter)
            return self.model(**batch)

    def _switch_to(self, adapter: str) -> None:
        # PEFT's `set_adapter` (by default) and `enable_adapter_layers` mark the active adapter trainable, even one
        # loaded for inference (`PeftModel.from_pretrained`'s default): serving must not change that.
        self.model.set_adapter(adapter, inference_mode=self.model.peft_config[adapter].inference_mode)

    def _learn(self, adapter: str | None, num_tokens: int, latency_ms: float) -> None:
        observed = self.cost_models[adapter]
        observed.update(num_tokens, latency_ms)
        # What drifts while serving is the machine (another process on the cores, a busy event loop), and it slows
        # every choice alike. Were only the chosen adapter's scale to follow it, the others would look faster than
        # they now are, and a loaded server would flip to a weaker ratio that then runs late.
        for cost_model in self.cost_models.values():
            cost_model.scale = observed.scale

    def _check_adapter(self, adapter: str | None) -> None:
        if adapter not in self.adapters:
            raise ValueError(f"Unknown adapter {adapter!r}; this scheduler chooses among {self.adapters}.")


def count_tokens(batch: Mapping[str, Any]) -> int:
    """Token positions the model computes for a batch: batch size x sequence length of `input_ids` (or, without
    it, of `attention_mask`).

    Padding costs as much as real tokens (attention and the uncompressed FFN run over every position, and the
    compressed groups are planned to the longest sequence), so latency follows the padded size, not the mask's sum.
    """
    for key in ("input_ids", "attention_mask"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor):
            return value.numel()
    raise ValueError(
        f"Cannot count the tokens of a batch with keys {sorted(batch)}: it needs an `input_ids` or `attention_mask` "
        "tensor."
    )


def _real_tokens(batch: Mapping[str, Any]) -> int:
    """Tokens that are not padding: the attention mask's sum, or every position without a mask."""
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        return int(mask.sum())
    return count_tokens(batch)


def _num_sequences(batch: Mapping[str, Any]) -> int:
    for key in ("input_ids", "attention_mask"):
        if isinstance(batch.get(key), torch.Tensor):
            return batch[key].shape[0] if batch[key].dim() > 1 else 1
    return 1


def _order_by_compression(model: nn.Module, adapters: Sequence[str | None]) -> list[str | None]:
    if isinstance(adapters, str) or not isinstance(adapters, Sequence) or not adapters:
        raise ValueError(
            f"`adapters` must be a non-empty list of adapter names (None for uncompressed), got {adapters!r}."
        )
    if not all(name is None or isinstance(name, str) for name in adapters):
        raise ValueError(f"`adapters` must hold adapter names (str) or None for uncompressed, got {list(adapters)}.")
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"`adapters` must not repeat a name, got {list(adapters)}.")
    loaded = getattr(model, "peft_config", None)
    if not isinstance(loaded, Mapping) or not hasattr(model, "disable_adapter"):
        raise ValueError(
            f"`model` must be a PeftModel carrying Variator adapters, got {type(model).__name__}. Wrap it with "
            "`get_peft_model(model, VariatorConfig(...))`."
        )
    for name in adapters:
        if name is None:
            continue
        if name not in loaded:
            raise ValueError(f"Adapter {name!r} in `adapters` is not loaded in the model; loaded: {sorted(loaded)}.")
        if not isinstance(getattr(loaded[name], "ratio", None), int):
            raise ValueError(f"Adapter {name!r} is not a Variator adapter (it has no compression `ratio`).")
    # sorted() is stable: adapters of equal ratio keep the caller's order.
    return sorted(adapters, key=lambda name: 1 if name is None else loaded[name].ratio)


def _sub_batches(batch: Mapping[str, Any], fractions: list[float]) -> list[dict[str, Any]]:
    input_ids = batch.get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("`calibrate` needs a batch with a 2-D `input_ids` tensor (batch, seq_len).")
    rows, columns = input_ids.shape
    shapes = sorted({(max(1, round(rows * f)), max(1, round(columns * g))) for f in fractions for g in fractions})
    mask = batch.get("attention_mask")
    # Shorter sequences are cut from the side the padding is not on, so they keep real tokens.
    left_padded = isinstance(mask, torch.Tensor) and not bool(mask[:, 0].all()) and bool(mask[:, -1].all())
    sub_batches = []
    for num_rows, num_columns in shapes:
        kept_columns = slice(columns - num_columns, None) if left_padded else slice(None, num_columns)
        sub_batch = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == (rows, columns):
                value = value[:num_rows, kept_columns]
            elif isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows:
                value = value[:num_rows]
            sub_batch[key] = value
        mask = sub_batch.get("attention_mask")
        if isinstance(mask, torch.Tensor) and not bool(mask.any(dim=1).all()):
            # A truncation that leaves a row all padding is not a batch a server ever sees.
            continue
        sub_batches.append(sub_batch)
    if not sub_batches:
        raise ValueError(
            "`calibrate` cut `batch` into smaller batches by `fractions`, and each left some row with no real token "
            "(`attention_mask` all 0). Calibrate on a batch of similar lengths, or with larger `fractions`."
        )
    return sub_batches


def _percentile(values: list[float], percent: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(percent / 100.0 * len(ordered)))
    return ordered[rank - 1]


def _label(adapter: str | None) -> str:
    return "uncompressed" if adapter is None else adapter


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")


def _check_smoothing(smoothing: object) -> None:
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0.0 < smoothing <= 1.0:
        raise ValueError(f"`smoothing` must be a number in (0, 1], got {smoothing!r}.")


def _check_number(name: str, value: object, minimum: float, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    if value < minimum or (strict and value == minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"`{name}` must be a number {bound}, got {value!r}.")
