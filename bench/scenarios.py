"""Issue 4's larger figures, one scenario a run: each prints its own table.

- ``concurrency1000``: 1,000 streams at once, 50 tokens 20 ms apart: are any lost?
- ``paced200``: 200 streams at 50 tokens/s through one worker: is any token late > 50 ms?
- ``hold10k``: 10,000 open streams on one gateway, a token a second: memory, Redis
  connections, every token in order.
"""

from __future__ import annotations

import resource

from . import shards
from .compare import describe, pair, quantile
from .loadgen import Spec
from .measure import percentile
from .options import Options
from .report import Table, diff_ms, ms, num, ratio, verdict
from .runner import Bench, Phase, progress


async def run(o: Options, bench: Bench) -> list[Table]:
    phases: dict[str, Phase] = {}
    for target in bench.targets(o.targets):
        spec = Spec(target.port, o.streams, 1, o.tokens, o.delay, f"{target.name[0]}")
        spec.timeout_s = o.timeout + o.tokens * o.delay
        close = True
        if o.scenario in ("paced200", "hold10k"):
            spec.stamp = True
        if o.scenario == "paced200":
            spec.record_lateness = True
        elif o.scenario == "hold10k":
            spec.ready_on, spec.ramp_per_s = "token", o.ramp
            spec.timeout_s += o.streams / o.ramp
            close = False  # every stream runs to its end: every token must arrive in order
        progress(
            f"{target.name}: {o.streams} streams of {o.tokens} tokens {o.delay * 1000:g} ms apart"
            f" from {o.client_procs} client process(es)"
        )
        phases[target.name] = result = await bench.phase(target, spec, close_when_held=close)
        progress(describe(target, result))
        await bench.drain(60 + o.streams / 100)
    tables = [table(o, phases)]
    if o.shards > 1 and "streamgate" in phases:
        tables.append(shards.table(f"{o.scenario}: per shard ({o.shards})", phases["streamgate"]))
    return tables


def table(o: Options, phases: dict[str, Phase]) -> Table:
    t = Table(
        f"{o.scenario}: {o.streams} streams of {o.tokens} tokens {o.delay * 1000:g} ms apart,"
        f" {o.workers} worker(s) (WORKER_MAX_JOBS {o.worker_max_jobs})"
    )
    d, s = pair(phases, lambda p: p.summary.requests)
    if o.scenario == "hold10k":
        d, s = pair(phases, lambda p: p.held_streams)
        t.add(
            "streams open at once (when all had a token)",
            num(d),
            num(s),
            "",
            verdict(None if s is None else s >= o.streams, f"{o.streams}"),
        )
    d, s = pair(phases, lambda p: p.summary.failed)
    lost_ok = None if s is None else s == 0
    t.add("streams lost (no `done`)", num(d), num(s), "", verdict(lost_ok, "0"))
    t.add(
        "tokens lost / duplicated / reordered",
        *_exact(phases),
        "",
        verdict(_all_exact(phases), "0 / 0 / 0"),
    )
    for q in (50, 99):
        d, s = pair(phases, quantile(lambda p: p.summary.ttft, q))
        t.add(f"time to first token p{q}", ms(d), ms(s), diff_ms(s, d))
    if o.scenario != "hold10k":
        ideal = o.tokens * o.delay
        for q in (50, 99, 100):
            d, s = pair(phases, quantile(lambda p: p.summary.durations, q))
            t.add(
                f"stream duration p{q} (paced ideal {ideal:g} s)", ms(d, 0), ms(s, 0), diff_ms(s, d)
            )
    if o.scenario in ("paced200", "hold10k"):
        _lateness(t, o, phases)
    d, s = pair(phases, lambda p: p.summary.tokens_per_s)
    t.add("tokens/s delivered", num(d), num(s), ratio(s, d))
    d, s = pair(phases, lambda p: p.cpu_per_1k("front"))
    _, w = pair(phases, lambda p: p.cpu_per_1k("worker"))
    t.add("CPU s / 1,000 tokens: relay / gateway", num(d, "{:.3f}"), num(s, "{:.3f}"), ratio(s, d))
    t.add(
        "CPU s / 1,000 tokens: worker(s)",
        "—",
        num(w, "{:.3f}"),
        "",
        verdict(None if w is None else w <= 0.060, "≤ 0.060 s"),
    )
    both = None if s is None or w is None else s + w
    t.add(
        "CPU s / 1,000 tokens: gateway + worker",
        num(d, "{:.3f}"),
        num(both, "{:.3f}"),
        ratio(both, d),
        verdict(None if both is None or d is None else both <= d, "≤ direct relay"),
    )
    _, r = pair(phases, lambda p: p.cpu_per_1k("redis"))
    t.add("CPU s / 1,000 tokens: Redis", "—", num(r, "{:.3f}"))
    _redis_per_token(t, phases.get("streamgate"))
    if o.scenario == "hold10k":
        d, s = pair(phases, lambda p: p.rss_per_stream)
        dh, sh = pair(phases, lambda p: p.held_streams)
        # Memory kept from streams that already failed would be charged to the survivors.
        full = all(n is None or n >= o.streams for n in (dh, sh))
        t.add(
            "RSS per open stream of the front process"
            + ("" if full else " (not valid: not every stream was open at once)"),
            num(None if d is None else d / 1024, "{:.1f}", " KB"),
            num(None if s is None else s / 1024, "{:.1f}", " KB"),
            ratio(s, d),
            verdict(None if s is None or not full else s <= 50 * 1024, "≤ 50 KB"),
        )
    sg = phases.get("streamgate")
    if sg is not None and sg.connections is not None:
        first = " (first shard)" if o.shards > 1 else ""
        t.add(
            f"Redis connections of the gateway{first}, peak (blocking XREAD)",
            "—",
            f"{sg.connections.total} ({sg.blocking_peak})",
            "",
            verdict(sg.blocking_peak <= 4, "relaying ≤ 4"),
        )
        waits = sg.summary.enqueue_to_start_ms
        t.add(
            "enqueue → start p50 / p99 (stream ids, 1 ms steps)",
            "—",
            f"{num(percentile(waits, 50))} / {num(percentile(waits, 99))} ms",
        )
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    t.notes.append(
        f"Clients: {o.client_procs} load generator process(es) (asyncio, uvloop), open files"
        f" raised to {files}; streams opened "
        + (f"at {o.ramp:g}/s" if o.scenario == "hold10k" else "all at once")
        + "."
    )
    if o.scenario in ("paced200", "hold10k"):
        t.notes.append(
            "Lateness of token i: its arrival minus (arrival of t0 + i * delay), so the"
            " demo LLM's own drift (its sleeps run late under load) counts for both columns;"
            " the difference between the columns is what the queue adds. Delay after the"
            " LLM sent it: each token carries the demo LLM's clock when it wrote the token"
            " ([stamp]); the client's read minus that, on the same monotonic clock."
        )
    for name, phase in phases.items():
        if phase.summary.failed:
            t.notes.append(f"{name} failures: {phase.summary.errors_text()}")
    return t


def _lateness(t: Table, o: Options, phases: dict[str, Phase]) -> None:
    if o.scenario == "paced200":
        for q in (50, 99, 100):
            d, s = pair(phases, quantile(lambda p: p.summary.late, q))
            t.add(f"token lateness vs schedule p{q} (all tokens)", ms(d), ms(s), diff_ms(s, d))
        for q in (99, 100):
            d, s = pair(phases, quantile(lambda p: p.summary.gaps, q))
            t.add(
                f"gap to previous token minus {o.delay * 1000:g} ms, p{q}",
                ms(d),
                ms(s),
                diff_ms(s, d),
            )
    else:
        for q in (50, 99, 100):
            d, s = pair(phases, quantile(lambda p: p.summary.late_max, q))
            t.add(
                f"latest token of a stream vs schedule, p{q} of streams",
                ms(d),
                ms(s),
                diff_ms(s, d),
            )
    d, s = pair(phases, lambda p: sum(1 for x in p.summary.late_max if x > 0.050))
    t.add(
        "streams with a token > 50 ms late vs schedule (the whole box)",
        num(d),
        num(s),
        "",
        verdict(None if s is None else s == 0, "0"),
    )
    # The relay's own share: from the demo LLM's write of each token to the client's read,
    # so the LLM's drift on a saturated box is not charged to the relay.
    for q in (50, 99, 100):
        d, s = pair(phases, quantile(lambda p: p.summary.delays or p.summary.delay_max, q))
        what = "all tokens" if o.scenario == "paced200" else "slowest token of each stream"
        t.add(f"delay LLM sent → client read p{q} ({what})", ms(d), ms(s), diff_ms(s, d))
    d, s = pair(phases, lambda p: sum(1 for x in p.summary.delay_max if x > 0.050))
    t.add(
        "streams with a token > 50 ms after the LLM sent it",
        num(d),
        num(s),
        "",
        verdict(None if s is None else s == 0, "0"),
    )


def _redis_per_token(t: Table, sg: Phase | None) -> None:
    """Redis's CPU per token as Redis counts it, and which commands it went to."""
    if sg is None or sg.redis is None or not sg.summary.tokens:
        return
    tokens = sg.summary.tokens
    cpu_us = sg.redis.cpu_s / tokens * 1e6
    t.add("Redis CPU µs / token (its INFO cpu, sys + user)", "—", f"{cpu_us:.1f}")
    top = sg.redis.top(tokens)
    t.notes.append(
        "Redis per token by command (its INFO commandstats: µs per token, calls per token in"
        " brackets; a command that a function calls counts again inside `fcall`): "
        + ", ".join(f"{name} {us:.1f} ({calls:.2f})" for name, us, calls in top)
        + "."
    )


def _exact(phases: dict[str, Phase]) -> tuple[str, str]:
    def text(name: str) -> str:
        p = phases.get(name)
        if p is None:
            return "—"
        s = p.summary
        return f"{s.lost} / {s.duplicated} / {s.reordered}" + (
            f" (+{s.corrupt} corrupt)" if s.corrupt else ""
        )

    return text("direct"), text("streamgate")


def _all_exact(phases: dict[str, Phase]) -> bool | None:
    """The verdict is Streamgate's: the direct relay is the baseline, not under test."""
    sg = phases.get("streamgate")
    return None if sg is None else sg.summary.exact and not sg.summary.after_final
