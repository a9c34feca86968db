"""The main run: the same phases against the direct relay and Streamgate, one table."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from . import shards
from .loadgen import Spec
from .measure import EnqueueProbe, percentile
from .options import Options
from .report import Table, diff_ms, ms, num, ratio, verdict
from .runner import Bench, Phase, Target, progress
from .stats import Summary

Pair = tuple[float | None, float | None]


def pair(phases: dict[str, Phase], value: Callable[[Phase], float | None]) -> Pair:
    direct = value(phases["direct"]) if "direct" in phases else None
    streamgate = value(phases["streamgate"]) if "streamgate" in phases else None
    return direct, streamgate


def quantile(
    values: Callable[[Phase], Sequence[float]], q: float
) -> Callable[[Phase], float | None]:
    """A phase's q-th percentile of some figure, for ``pair``."""
    return lambda phase: percentile(values(phase), q)


def busy(phase: Phase) -> float | None:
    """How busy the whole machine was during a phase, in % of all its CPUs."""
    cpus = os.cpu_count() or 1
    if not phase.wall or "machine" not in phase.cpu:
        return None
    return phase.cpu["machine"] / (phase.wall * cpus) * 100


def describe(target: Target, phase: Phase) -> str:
    s = phase.summary
    closed = f", {s.closed_by_bench} dropped by the bench" if s.closed_by_bench else ""
    return (
        f"  {target.name}: {s.ok}/{s.requests} ok{closed}, {s.tokens} tokens in"
        f" {phase.wall:.1f} s, first token p50 {ms(percentile(s.ttft, 50))}"
        f" p99 {ms(percentile(s.ttft, 99))}"
        + (f", failures: {s.errors_text()}" if s.failed else "")
        + "\n    CPU s: "
        + ", ".join(f"{name} {seconds:.2f}" for name, seconds in phase.cpu.items())
        + f" (of {phase.wall:.1f} s wall x {os.cpu_count()} CPUs)"
    )


async def run(o: Options, bench: Bench) -> list[Table]:
    targets = bench.targets(o.targets)
    totals = {t.name: Summary() for t in targets}

    async def phase(target: Target, spec: Spec, procs: int | None = None) -> Phase:
        result = await bench.phase(target, spec, procs)
        totals[target.name].add_summary(result.summary)
        progress(describe(target, result))
        await bench.drain()
        return result

    warm = 1 if o.quick else 3
    progress(f"warm-up: {_n(warm, 'request')} to each")
    for t in targets:
        await phase(t, Spec(t.port, 1, warm, tokens=5, delay_s=0.0, label="warm"), 1)

    progress(f"idle CPU for {o.idle_seconds:g} s")
    idle = await bench.idle_cpu(o.idle_seconds)

    levels: dict[int, dict[str, Phase]] = {}
    probe_delays: list[float] = []
    for level in o.clients:
        levels[level] = {}
        for t in targets:
            if level == 1:
                spec = Spec(t.port, 1, o.samples, min(o.tokens, 10), o.delay, f"{t.name}-1")
                progress(f"{t.name}: 1 client, {o.samples} requests one after another")
            else:
                spec = Spec(t.port, level, o.rounds, o.tokens, o.delay, f"{t.name}-{level}")
                progress(f"{t.name}: {level} concurrent clients, {_n(o.rounds, 'request')} each")
            spec.timeout_s = o.timeout
            probes = (
                [await EnqueueProbe(redis).start() for redis in bench.redises]
                if level == 1 and t.is_streamgate
                else []
            )
            levels[level][t.name] = await phase(t, spec, 1 if level == 1 else None)
            for probe in probes:
                probe_delays += await probe.stop()

    hold: dict[str, Phase] = {}
    for t in targets:
        progress(f"{t.name}: holding {o.hold} open streams for RSS per stream")
        spec = Spec(t.port, o.hold, 1, 1000, o.hold_delay, f"{t.name}-hold", ready_on="token")
        spec.ramp_per_s, spec.timeout_s = o.ramp, o.timeout + o.hold / o.ramp
        hold[t.name] = await phase(t, spec)

    saturation: dict[str, Phase] = {}
    for t in targets:
        progress(f"{t.name}: saturation, {o.sat_clients} clients for {o.sat_seconds:g} s")
        spec = Spec(t.port, o.sat_clients, 10**9, o.sat_tokens, 0.0, f"{t.name}-sat")
        spec.deadline_in_s, spec.timeout_s = o.sat_seconds, o.timeout
        saturation[t.name] = await phase(t, spec)

    tables = [table(o, levels, probe_delays, hold, saturation, idle, totals)]
    if o.shards > 1:
        paced_level = _paced_level(o, levels)
        for title, phases in (
            (f"{_n(paced_level, 'client')} paced", levels[paced_level]),
            (f"saturation, {_n(o.sat_clients, 'client')}", saturation),
        ):
            if "streamgate" in phases:
                tables.append(
                    shards.table(f"{title}: per shard ({o.shards})", phases["streamgate"])
                )
    return tables


def table(
    o: Options,
    levels: dict[int, dict[str, Phase]],
    probe_delays: list[float],
    hold: dict[str, Phase],
    saturation: dict[str, Phase],
    idle: dict[str, float],
    totals: dict[str, Summary],
) -> Table:
    t = Table(
        f"Direct relay vs Streamgate: {o.tokens} tokens {o.delay * 1000:g} ms apart"
        f" (1 client: {min(o.tokens, 10)} tokens), {o.workers} worker(s),"
        f" WORKER_MAX_JOBS {o.worker_max_jobs}"
    )
    for level, phases in levels.items():
        who = _n(level, "client")
        for q, limit in ((50, 0.003), (99, 0.010)):
            d, s = pair(phases, quantile(lambda p: p.summary.ttft, q))
            ok = None if d is None or s is None else s - d <= limit
            target = f"≤ +{limit * 1000:g} ms" if level == 1 else ""
            t.add(
                f"time to first token p{q}, {who}",
                ms(d),
                ms(s),
                diff_ms(s, d),
                verdict(ok, target) if target else "",
            )

    one = levels.get(1, {}).get("streamgate")
    if one is not None:
        s1 = one.summary
        t.add(
            "Streamgate, 1 client, p50: connect → `queued` / → `started` / → first token",
            "—",
            " / ".join(ms(percentile(v, 50)) for v in (s1.to_queued, s1.to_started, s1.ttft)),
        )
    for q, limit in ((50, 0.002), (99, 0.010)):
        value = percentile(probe_delays, q)
        ok = None if value is None else value <= limit
        t.add(
            f"enqueue → start p{q}, 1 client (keyspace probe)",
            "—",
            ms(value, 2),
            "",
            verdict(ok, f"≤ {limit * 1000:g} ms"),
        )
    for level, phases in levels.items():
        if "streamgate" in phases:
            waits = phases["streamgate"].summary.enqueue_to_start_ms
            p50, p99 = percentile(waits, 50), percentile(waits, 99)
            t.add(
                f"enqueue → start p50 / p99, {_n(level, 'client')} (stream ids, 1 ms steps)",
                "—",
                f"{num(p50)} / {num(p99)} ms",
            )

    for level, phases in levels.items():
        if level == 1 or o.delay <= 0:
            continue
        asked = level / o.delay
        d, s = pair(phases, lambda p: p.summary.tokens_per_s)
        t.add(
            f"tokens/s delivered, {level} clients paced (asked for {asked:,.0f}/s)",
            num(d),
            num(s),
            ratio(s, d),
        )
    d, s = pair(saturation, lambda p: p.summary.tokens_per_s)
    t.add(
        f"tokens/s at saturation ({o.sat_clients} clients, {o.sat_tokens} tokens back to back)",
        num(d),
        num(s),
        ratio(s, d),
    )
    d, s = pair(saturation, lambda p: p.summary.tokens / max(1, p.summary.token_events))
    t.add("tokens per SSE event at saturation", num(d, "{:.1f}"), num(s, "{:.1f}"))

    paced_level = _paced_level(o, levels)
    paced = levels[paced_level]
    where = f"{_n(paced_level, 'client')} paced"
    d, s = pair(paced, lambda p: p.cpu_per_1k("front"))
    t.add(
        f"CPU s / 1,000 tokens, {where}: relay / gateway",
        num(d, "{:.3f}"),
        num(s, "{:.3f}"),
        ratio(s, d),
    )
    _, w = pair(paced, lambda p: p.cpu_per_1k("worker"))
    t.add(
        f"CPU s / 1,000 tokens, {where}: worker(s)",
        "—",
        num(w, "{:.3f}"),
        "",
        verdict(None if w is None else w <= 0.060, "≤ 0.060 s"),
    )
    both = None if s is None or w is None else s + w
    t.add(
        f"CPU s / 1,000 tokens, {where}: gateway + worker",
        num(d, "{:.3f}"),
        num(both, "{:.3f}"),
        ratio(both, d),
        verdict(None if both is None or d is None else both <= d, "≤ direct relay"),
    )
    _, r = pair(paced, lambda p: p.cpu_per_1k("redis"))
    t.add(f"CPU s / 1,000 tokens, {where}: Redis", "—", num(r, "{:.3f}"))
    d, s = pair(paced, lambda p: p.cpu_per_1k("llm"))
    t.add(
        f"CPU s / 1,000 tokens, {where}: demo LLM (the same work)",
        num(d, "{:.3f}"),
        num(s, "{:.3f}"),
    )
    d, s = pair(paced, lambda p: p.cpu_per_1k("clients"))
    t.add(
        f"CPU s / 1,000 tokens, {where}: load generator (for scale)",
        num(d, "{:.3f}"),
        num(s, "{:.3f}"),
    )
    d, s = pair(paced, busy)
    t.add(
        f"whole machine busy, {where} (every process, other users' too)",
        num(d, "{:.0f}", " %"),
        num(s, "{:.0f}", " %"),
    )
    d, s = pair(saturation, lambda p: p.cpu_per_1k("front"))
    _, w = pair(saturation, lambda p: p.cpu_per_1k("worker"))
    both = None if s is None or w is None else s + w
    t.add(
        "CPU s / 1,000 tokens at saturation: relay vs gateway + worker",
        num(d, "{:.3f}"),
        num(both, "{:.3f}"),
        ratio(both, d),
    )

    d50, s50 = pair(hold, quantile(lambda p: p.summary.ttft, 50))
    d99, s99 = pair(hold, quantile(lambda p: p.summary.ttft, 99))
    t.add(
        f"time to first token p50 / p99, opening {o.hold} streams at {o.ramp:g}/s",
        f"{ms(d50, 0)} / {ms(d99, 0)}",
        f"{ms(s50, 0)} / {ms(s99, 0)}",
    )
    d, s = pair(hold, lambda p: p.rss_per_stream)
    dh, sh = pair(hold, lambda p: p.held_streams)
    # Memory a process kept from streams that already failed would be charged to the
    # survivors: the figure only stands when every stream was open at once.
    # Each column stands on its own: a stream the direct relay lost voids only its figure.
    d_full, s_full = (n is not None and n >= o.hold for n in (dh, sh))

    def rss(value: float | None, full: bool, open_now: float | None) -> str:
        text = num(None if value is None else value / 1024, "{:.1f}", " KB")
        return text if full or value is None else f"{text} (not valid: {num(open_now)} open)"

    t.add(
        f"RSS per open stream ({o.hold} open, a token every {o.hold_delay:g} s)",
        rss(d, d_full, dh),
        rss(s, s_full, sh),
        ratio(s, d) if d_full and s_full else "",
        verdict(None if s is None or not s_full else s <= 50 * 1024, "≤ 50 KB"),
    )
    for label, phases in ((where, paced), (f"{o.hold} streams held", hold)):
        sg = phases.get("streamgate")
        if sg is not None and sg.connections is not None:
            t.add(
                f"Redis connections of the gateway, peak, {label} (blocking XREAD)",
                "—",
                f"{sg.connections.total} ({sg.blocking_peak})",
                "",
                verdict(sg.blocking_peak <= 4, "relaying ≤ 4"),
            )

    workers = [v for k, v in idle.items() if k.startswith("worker")]
    if workers:
        t.add(
            f"idle CPU, busiest worker process ({o.idle_seconds:g} s)",
            "—",
            f"{max(workers):.1f} %",
            "",
            verdict(max(workers) < 1.0, "< 1 %"),
        )
    t.add("idle CPU, relay / gateway", f"{idle['relay']:.1f} %", f"{idle['gateway']:.1f} %")
    t.add("idle CPU, Redis", "—", f"{idle['redis']:.1f} %")

    d_sum, s_sum = totals.get("direct"), totals.get("streamgate")
    t.add(
        "requests failed (all phases)",
        _failed(d_sum),
        _failed(s_sum),
        "",
        verdict(None if s_sum is None else s_sum.failed == 0, "0"),
    )
    t.add(
        "tokens lost / duplicated / reordered (all phases)",
        _exact(d_sum),
        _exact(s_sum),
        "",
        verdict(None if s_sum is None else s_sum.exact and not s_sum.after_final, "0 / 0 / 0"),
    )

    t.notes += [
        f"Time to first token is from the client's connect to the first token event; the demo"
        f" LLM waits {o.delay * 1000:g} ms before every token, the first included, for both.",
        f"1 client: {o.samples} requests one after another (p99 of so few is near the maximum);"
        f" more clients: {_n(o.rounds, 'request')} each, all clients at once. CPU per token"
        f" is read at the most clients the machine kept pace with (80 % of the tokens asked).",
        "Enqueue → start (probe): the gap between the `queued` and `started` XADDs of each job"
        " as Redis keyspace notifications reach the bench; (stream ids): the same gap from the"
        " millisecond part of the two events' ids, under load.",
        "CPU is utime + stime from /proc/<pid>/stat (10 ms ticks) around the phase, divided by"
        " the tokens the clients received; RSS is VmRSS of the front process with the streams"
        " open minus before they opened; Redis connections are the gateway's sockets to Redis"
        " (from /proc) matched to CLIENT LIST, the last command telling the blocking ones.",
        "Clients run in their own processes (hand-written asyncio HTTP/SSE, uvloop); every"
        " answer is `t0 t1 … t{N-1}`, so every stream is checked token by token.",
    ]
    for name, summary in totals.items():
        if summary.failed:
            t.notes.append(f"{name} failures: {summary.errors_text()}")
    return t


def _paced_level(o: Options, levels: dict[int, dict[str, Phase]]) -> int:
    """The most clients the machine kept pace with (80 % of the tokens asked), where CPU per
    token is read: once it cannot, tokens pile up and go out in batches, which is cheaper
    per token and not the norm."""
    kept_up = [
        level
        for level, phases in levels.items()
        if level > 1
        and o.delay > 0
        and all(
            x is None or x >= 0.8 * level / o.delay
            for x in pair(phases, lambda p: p.summary.tokens_per_s)
        )
    ]
    return max(kept_up or [level for level in levels if level > 1] or list(levels))


def _failed(s: Summary | None) -> str:
    return "—" if s is None else f"{s.failed} of {s.requests}"


def _exact(s: Summary | None) -> str:
    if s is None:
        return "—"
    text = f"{s.lost} / {s.duplicated} / {s.reordered}"
    if s.corrupt or s.after_final:
        text += f" (+{s.corrupt} corrupt, {s.after_final} after the final event)"
    return text


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
