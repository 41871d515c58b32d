"""Open-loop load test of examples/serve.py: fixed uncompressed vs fixed ratio 4 and 8 vs the ratio scheduler.

For each mode the server is started on 127.0.0.1 (loopback only) in its own process, and `/embed` is driven by a
Poisson arrival process that does not wait for answers (open loop, as real clients do): light load, then a burst at
`--burst` times the uncompressed server's capacity (measured first, closed loop), then light load again. The same
arrival times and texts are replayed for every mode. The run is bounded in requests and in time and stops by itself.

    flock /tmp/peft_variator_cpu.lock python benchmarks/load.py

Writes docs/serving.md (table + command), docs/serving_latency.png (latency over time) and
benchmarks/results/load.json (every request).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import httpx

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
SERVE = os.path.join(ROOT, "examples", "serve.py")
MODES = {
    "uncompressed": ["--only", "uncompressed"],
    "ratio4": ["--only", "ratio4"],
    "ratio8": ["--only", "ratio8"],
    "scheduler": [],
}


@dataclass
class Phase:
    name: str
    seconds: float
    load: float  # arrival rate as a multiple of the uncompressed capacity


@dataclass
class Outcome:
    sent_at: float  # seconds since the start of the run
    phase: str
    latency_ms: float | None  # None: failed or unanswered
    status: int | None
    adapter: str | None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(mode: str, port: int, args: argparse.Namespace, log_path: str) -> subprocess.Popen:
    command = [
        sys.executable,
        SERVE,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--latency-budget-ms",
        str(args.latency_budget_ms),
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-wait-ms",
        str(args.max_wait_ms),
        "--threads",
        str(args.threads),
        "--calibration-tokens",
        str(args.max_words),
        *MODES[mode],
    ]
    log = open(log_path, "w")  # noqa: SIM115  (kept open for the server's lifetime, closed by stop_server)
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    server.log = log  # type: ignore[attr-defined]
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"The {mode} server exited with {server.returncode} while starting; see {log_path}.")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"The {mode} server did not answer within {args.startup_timeout} s; see {log_path}.")


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    server.log.close()  # type: ignore[attr-defined]


def make_texts(count: int, seed: int, min_words: int, max_words: int) -> list[str]:
    """Passages of `min_words` to `max_words` common words (about a token each), like the documents an embedding
    service indexes."""
    rng = random.Random(seed)
    words = (
        "the model serves requests under load while a burst of traffic arrives and each plugin compresses "
        "several tokens into one vector before the feed forward network so latency stays within the budget "
        "users search for documents questions answers products reviews news weather travel music sports"
    ).split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words))) for _ in range(count)]


def arrival_times(phases: list[Phase], capacity: float, seed: int, max_requests: int) -> list[tuple[float, str]]:
    """Poisson arrivals: exponential gaps at each phase's rate, cut at `max_requests`."""
    rng = random.Random(seed)
    arrivals, start = [], 0.0
    for phase in phases:
        rate, t = phase.load * capacity, start
        while True:
            t += rng.expovariate(rate)
            if t >= start + phase.seconds or len(arrivals) >= max_requests:
                break
            arrivals.append((t, phase.name))
        start += phase.seconds
    return arrivals


async def measure_capacity(url: str, texts: list[str], concurrency: int, seconds: float) -> float:
    """Closed-loop throughput (requests/s): `concurrency` clients, each sending its next request on an answer."""
    done = 0
    stop_at = time.perf_counter() + seconds

    async def client(index: int, http: httpx.AsyncClient) -> None:
        nonlocal done
        i = index
        while time.perf_counter() < stop_at:
            response = await http.post(url, json={"text": texts[i % len(texts)]})
            response.raise_for_status()
            done += 1
            i += concurrency

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60.0, limits=limits) as http:
        # Warm-up: the first batches of a fresh process are slow.
        await asyncio.gather(*(http.post(url, json={"text": text}) for text in texts[:concurrency]))
        started = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(concurrency)))
        return done / (time.perf_counter() - started)


async def drive(url: str, arrivals: list[tuple[float, str]], texts: list[str], drain_seconds: float) -> list[Outcome]:
    """Send each request at its arrival time without waiting for earlier answers; give up `drain_seconds` after the
    last arrival."""
    outcomes: list[Outcome | None] = [None] * len(arrivals)
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=drain_seconds + arrivals[-1][0], limits=limits) as http:
        start = time.perf_counter()

        async def send(index: int, at: float, phase: str) -> None:
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.perf_counter()
            try:
                response = await http.post(url, json={"text": texts[index % len(texts)]})
                latency = (time.perf_counter() - sent) * 1000.0
                adapter = response.json().get("adapter") if response.status_code == 200 else None
                outcomes[index] = Outcome(sent - start, phase, latency, response.status_code, adapter)
            except (httpx.HTTPError, ValueError):
                outcomes[index] = Outcome(sent - start, phase, None, None, None)

        tasks = [asyncio.create_task(send(i, at, phase)) for i, (at, phase) in enumerate(arrivals)]
        _, unfinished = await asyncio.wait(tasks, timeout=arrivals[-1][0] + drain_seconds)
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
    return [
        outcome if outcome is not None else Outcome(at, phase, None, None, None)
        for outcome, (at, phase) in zip(outcomes, arrivals, strict=True)
    ]


def percentile(values: list[float], percent: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(len(ordered) * percent / 100)) - 1]


def summarize(outcomes: list[Outcome], budget_ms: float, phase: str | None = None) -> dict:
    chosen = [o for o in outcomes if phase is None or o.phase == phase]
    answered = [o for o in chosen if o.latency_ms is not None and o.status == 200]
    latencies = [o.latency_ms for o in answered]
    span = (max(o.sent_at for o in chosen) - min(o.sent_at for o in chosen)) if len(chosen) > 1 else 0.0
    last_answer = max((o.sent_at + o.latency_ms / 1000.0 for o in answered), default=0.0)
    first_sent = min((o.sent_at for o in chosen), default=0.0)
    return {
        "requests": len(chosen),
        "answered": len(answered),
        "failed": len(chosen) - len(answered),
        "offered_per_s": len(chosen) / span if span else None,
        "throughput_per_s": len(answered) / (last_answer - first_sent) if last_answer > first_sent else None,
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "uncompressed_share": sum(o.adapter == "uncompressed" for o in answered) / len(answered) if answered else None,
        # Unanswered requests missed the budget too.
        "budget_misses": sum(o.latency_ms is None or o.latency_ms > budget_ms for o in chosen),
    }


def plot(runs: dict[str, list[Outcome]], phases: list[Phase], budget_ms: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"uncompressed": "tab:blue", "ratio2": "tab:green", "ratio4": "tab:orange", "ratio8": "tab:red"}
    figure, axes = plt.subplots(len(runs), 1, figsize=(10, 2.6 * len(runs)), sharex=True, sharey=True)
    for axis, (mode, outcomes) in zip(axes, runs.items(), strict=True):
        for adapter, colour in colours.items():
            points = [(o.sent_at, o.latency_ms) for o in outcomes if o.adapter == adapter and o.latency_ms]
            if points:
                axis.scatter(*zip(*points, strict=True), s=3, color=colour, label=f"served {adapter}")
        start = 0.0
        for phase in phases:
            if phase.load > 1.0:
                axis.axvspan(start, start + phase.seconds, color="grey", alpha=0.15, lw=0)
            start += phase.seconds
        axis.axhline(budget_ms, color="black", ls="--", lw=1, label=f"budget {budget_ms:g} ms")
        axis.set_yscale("log")
        axis.set_ylabel("latency (ms)")
        axis.set_title(f"{mode} (shaded: burst)", fontsize=10)
        axis.legend(loc="upper left", fontsize=7, markerscale=3)
    axes[-1].set_xlabel("request sent at (s)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def write_report(path: str, summary: dict, args: argparse.Namespace, command: str, plot_name: str) -> None:
    budget = args.latency_budget_ms

    def cell(value, fmt="{:.0f}") -> str:
        return "n/a" if value is None else fmt.format(value)

    lines = [
        "# Serving under load: ratio switching",
        "",
        "`examples/serve.py` serves all-MiniLM-L6-v2 embeddings with Variator plugins of ratios 2, 4 and 8 "
        "(untrained: this measures speed, not quality), started by this benchmark with these settings: requests are "
        f"micro-batched (up to {args.max_batch_size} texts, {args.max_wait_ms:g} ms wait), and `RatioScheduler` runs "
        f"each batch with the least compression whose predicted latency plus queue delay fits a {budget:g} ms budget.",
        "",
        f"Load: Poisson arrivals, {', '.join(f'{p.name} {p.load:g}x for {p.seconds:g} s' for p in summary['phases'])}"
        f" of the uncompressed capacity, measured closed loop at {summary['capacity_per_s']:.1f} requests/s. "
        "The same arrivals and texts are replayed against each mode; latency is end to end, seen by the client.",
        "",
        f"Machine: {summary['machine']}. Measured {summary['date']}.",
        "",
        "| mode | phase | requests | throughput (req/s) | p50 (ms) | p95 (ms) | served uncompressed | budget misses |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode, phases in summary["modes"].items():
        for phase, row in phases.items():
            lines.append(
                f"| {mode} | {phase} | {row['requests']} | {cell(row['throughput_per_s'], '{:.1f}')} | "
                f"{cell(row['p50_ms'])} | {cell(row['p95_ms'])} | {cell(row['uncompressed_share'], '{:.0%}')} | "
                f"{row['budget_misses']} ({row['budget_misses'] / max(row['requests'], 1):.0%}) |"
            )
    lines += ["", f"![latency over time]({plot_name})", ""]
    bursts = {mode: phases["burst"] for mode, phases in summary["modes"].items()}
    lines += [
        "Reading it: a fixed ratio can only be fast everywhere or accurate everywhere; the scheduler serves the "
        "uncompressed model while it keeps up and switches to compression as soon as arrivals outrun it. No schedule "
        "sustains more than the strongest plugin's throughput: ratio 8 runs the FFN on an eighth of the tokens, but "
        "attention, embeddings, tokenization and HTTP are not compressed.",
        "",
    ]
    if {"uncompressed", "ratio8"} <= bursts.keys():
        strongest = bursts["ratio8"]["throughput_per_s"] / bursts["uncompressed"]["throughput_per_s"]
        offered, served = bursts["ratio8"]["offered_per_s"], bursts["ratio8"]["throughput_per_s"]
        lines += [
            f"In this run's burst {offered:.1f} requests/s arrived; fixed ratio 8, the most any schedule can do, "
            f"served {served:.1f}/s ({strongest:.2f}x the uncompressed server)"
            + (
                ", so even at ratio 8 a backlog builds for as long as the burst lasts: p95 stays within the budget "
                "only if compression starts with the burst's first batches, so that backlog stays short."
                if served < offered
                else "."
            ),
            "Each mode is a separate server run of the same arrivals, a minute or two apart, on 2 shared cores: "
            "throughput differences of 10-20 % between modes that run the same ratio are run-to-run noise.",
            "",
        ]
    lines += [
        "## How the scheduler decides",
        "",
        "`RatioScheduler.calibrate` times every choice (uncompressed, ratio2, ratio4, ratio8) on cuts of a sample "
        "batch and fits `latency = intercept + per_token * tokens` per choice by least squares. For each batch the "
        "server passes the time its oldest request has waited and how many requests are queued behind it; the "
        "scheduler adds the wait for the model lock and runs the least compression whose predicted latency plus that "
        "delay fits the budget, for this batch and for the queued requests after it (the strongest when none "
        "does). The server also reports every request as it arrives (`record_arrival`): a choice whose cost per "
        "token times the arrival rate would keep the model busy more than 90% of the time (`max_utilization`) is "
        "passed over even while the queue is still short, so a burst is met with compression from its first "
        "batches rather than once a backlog has built up. Every observed run refines a scale factor (an exponentially "
        "weighted mean of observed / predicted) that all choices share: a machine that turns slower (another process "
        "on the same cores) slows every ratio alike, and is followed within a few batches.",
        "",
        "```python",
        "scheduler = RatioScheduler(peft_model, [None, 'ratio2', 'ratio4', 'ratio8'], latency_budget_ms=300)",
        "scheduler.calibrate(sample_batch)",
        "scheduler.record_arrival(num_tokens)  # as each request comes in",
        "output, decision = scheduler.run(batch, queue_delay_ms=waited_ms, backlog_tokens=queued_tokens)",
        "scheduler.stats()  # batches/sequences per ratio, p50/p95, budget misses",
        "```",
        "",
        "Reproduce (writes this page, the plot and benchmarks/results/load.json; about 5 minutes on 2 cores):",
        "",
    ]
    lines += ["```", command, "```", ""]
    lines += summary.get("notes", [])
    with open(path, "w") as report:
        report.write("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-budget-ms", type=float, default=1000.0)
    parser.add_argument("--min-words", type=int, default=48, help="Shortest request text, in words (= tokens).")
    parser.add_argument("--max-words", type=int, default=160, help="Longest request text, in words (= tokens).")
    parser.add_argument("--light", type=float, default=0.25, help="Light load, as a multiple of the capacity.")
    parser.add_argument("--burst", type=float, default=2.0, help="Burst load, as a multiple of the capacity.")
    parser.add_argument("--light-seconds", type=float, default=12.0)
    parser.add_argument("--burst-seconds", type=float, default=6.0)
    parser.add_argument("--recovery-seconds", type=float, default=10.0)
    parser.add_argument("--max-requests", type=int, default=6000, help="Hard cap on requests per run.")
    parser.add_argument("--drain-seconds", type=float, default=45.0, help="Wait for answers after the last send.")
    parser.add_argument("--capacity-seconds", type=float, default=10.0)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the server. 1 leaves a core to the load generator: with every core busy, torch's "
        "spinning worker threads slow down many times over when another process needs a core.",
    )
    parser.add_argument("--startup-timeout", type=float, default=240.0)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--docs", default=os.path.join(ROOT, "docs"))
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="Rewrite the page and the plot from the load.json of an earlier run, without running anything.",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = reproduce_command(sys.argv[1:] if argv is None else argv)
    os.makedirs(args.docs, exist_ok=True)
    os.makedirs(args.results, exist_ok=True)
    if args.report_only:
        rewrite_report(args)
        return
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    phases = [
        Phase("light", args.light_seconds, args.light),
        Phase("burst", args.burst_seconds, args.burst),
        Phase("recovery", args.recovery_seconds, args.light),
    ]
    texts = make_texts(512, args.seed, args.min_words, args.max_words)
    capacity, arrivals, runs, summary_modes, server_stats = None, None, {}, {}, {}
    modes = ["uncompressed"] + [mode for mode in args.modes if mode != "uncompressed"]
    for mode in modes:
        port = free_port()
        log_path = os.path.join(args.results, f"server_{mode}.log")
        print(f"[{mode}] starting the server on 127.0.0.1:{port}", flush=True)
        server = start_server(mode, port, args, log_path)
        try:
            url = f"http://127.0.0.1:{port}/embed"
            if capacity is None:
                capacity = asyncio.run(measure_capacity(url, texts, 2 * args.max_batch_size, args.capacity_seconds))
                arrivals = arrival_times(phases, capacity, args.seed, args.max_requests)
                print(f"uncompressed capacity: {capacity:.1f} req/s; {len(arrivals)} requests per run", flush=True)
            httpx.post(f"http://127.0.0.1:{port}/stats/reset", timeout=10.0)
            outcomes = asyncio.run(drive(url, arrivals, texts, args.drain_seconds))
            server_stats[mode] = httpx.get(f"http://127.0.0.1:{port}/stats", timeout=10.0).json()
        finally:
            stop_server(server)
        runs[mode] = outcomes
        summary_modes[mode] = {
            phase.name: summarize(outcomes, args.latency_budget_ms, phase.name) for phase in phases
        } | {"all": summarize(outcomes, args.latency_budget_ms)}
        print(f"[{mode}]", json.dumps(summary_modes[mode], indent=1), flush=True)

    summary = {
        "capacity_per_s": capacity,
        "phases": phases,
        "modes": summary_modes,
        "machine": f"{os.cpu_count()} CPU cores, server with {args.threads} torch thread(s), load generator on the "
        "same machine",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "notes": targets(summary_modes, args.latency_budget_ms),
    }
    plot_name = "serving_latency.png"
    plot(runs, phases, args.latency_budget_ms, os.path.join(args.docs, plot_name))
    write_report(os.path.join(args.docs, "serving.md"), summary, args, command, plot_name)
    with open(os.path.join(args.results, "load.json"), "w") as out:
        json.dump(
            {
                "args": vars(args),
                "argv": sys.argv[1:] if argv is None else argv,
                "summary": {**summary, "phases": [asdict(p) for p in phases]},
                "server_stats": server_stats,
                "requests": {mode: [asdict(o) for o in outcomes] for mode, outcomes in runs.items()},
            },
            out,
        )
    print("\n".join(summary["notes"]))


def reproduce_command(argv: list[str]) -> str:
    return " ".join(["flock /tmp/peft_variator_cpu.lock python benchmarks/load.py", *argv])


def rewrite_report(args: argparse.Namespace) -> None:
    """The page and plot of the run saved in `args.results`/load.json, with that run's own settings."""
    with open(os.path.join(args.results, "load.json")) as saved:
        run = json.load(saved)
    run_args = argparse.Namespace(**run["args"])
    phases = [Phase(**phase) for phase in run["summary"]["phases"]]
    summary = {**run["summary"], "phases": phases}
    runs = {mode: [Outcome(**o) for o in outcomes] for mode, outcomes in run["requests"].items()}
    command = reproduce_command(run.get("argv", []))
    plot_name = "serving_latency.png"
    plot(runs, phases, run_args.latency_budget_ms, os.path.join(args.docs, plot_name))
    write_report(os.path.join(args.docs, "serving.md"), summary, run_args, command, plot_name)


def targets(modes: dict, budget_ms: float) -> list[str]:
    """The issue's targets, checked against this run."""
    notes = ["Targets (issue 4):", ""]
    scheduler, uncompressed = modes.get("scheduler"), modes.get("uncompressed")
    if scheduler and uncompressed:
        p95 = scheduler["burst"]["p95_ms"] or math.inf
        base_p95 = uncompressed["burst"]["p95_ms"] or math.inf
        notes.append(
            f"- Burst: scheduler p95 {p95:.0f} ms vs budget {budget_ms:g} ms "
            f"({'within' if p95 <= budget_ms else 'MISSED'}); uncompressed p95 {base_p95:.0f} ms "
            f"= {base_p95 / budget_ms:.1f}x the budget (target > 2x)."
        )
        share = scheduler["light"]["uncompressed_share"]
        notes.append(
            f"- Light load: scheduler served {share:.0%} uncompressed (target >= 90%: "
            f"{'met' if share is not None and share >= 0.9 else 'MISSED'})."
        )
    return notes


if __name__ == "__main__":
    main()
