"""The job that answers one chat, once claimed: stream the LLM, publish, end it exactly once.

Whatever happens, the ``finally`` block publishes the one final event, with two deliberate
exceptions: an attempt that lost ownership (the job was cancelled or ended from outside,
so its final event is already written), and a worker shutting down before the job published
any output (the job is handed back and queued again in one step, so another worker gives the
client one normal answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson

from shared import events as ev
from shared import tracing
from shared.event_log import Claim, Closing, EventLog, Turn, UsageRecord
from shared.roles import Role, Roles
from shared.settings import Settings

from .agent import OpenAIAgent
from .agents import AGENT_EVENTS, Agent, AgentError, AgentRequest, checked, event_of
from .heartbeat import Heartbeat
from .llm import Opening, Upstream, UpstreamError
from .metrics import WorkerMetrics
from .publisher import UNPUBLISHABLE, Fenced, Publisher
from .tools import Toolbox
from .tools.registry import cap_output

if TYPE_CHECKING:
    from opentelemetry.trace import Span

logger = logging.getLogger(__name__)


async def chat(ctx: dict[str, Any], job_id: str) -> str:
    log: EventLog = ctx["event_log"]
    upstream: Upstream = ctx["upstream"]
    owner: str = ctx["owner"]
    # With the request its wake-up carried, the LLM is called while the claim is on its way
    # (pickup.py); a session's history must be read first, so such a job waits.
    # Only the built-in agent's first request is known in advance.
    early = orjson.loads(ctx["early_request"]) if ctx.get("early_request") else None
    agent: Agent = ctx["agent"]
    opening = None
    prepared = None
    if early is not None and not early.get("session") and isinstance(agent, OpenAIAgent):
        prepared = _prepared(ctx, early, [])
        tools = early.get("tools") or prepared[1].schemas() or None
        opening = upstream.open(prepared[2], tools, early.get("params"))
    claim_future: asyncio.Future[Claim] = ctx["claim"]
    try:
        claim = await asyncio.shield(claim_future)
    except BaseException:
        if opening is not None:
            await upstream.abandon(opening)
        await _hand_back_if_claimed(claim_future, log, job_id, owner)
        raise
    metrics: WorkerMetrics = ctx["metrics"]
    if claim.result != "run":
        if opening is not None:
            await upstream.abandon(opening)
        logger.info("job %s not run: %s", job_id, claim.result)
        if claim.result in ("lost", "expired", "unwatched"):  # this attempt wrote the final
            ended_as = {"lost": "worker_lost", "expired": "expired", "unwatched": "cancelled"}
            metrics.jobs.labels(ended_as[claim.result]).inc()
        return claim.result

    request = orjson.loads(claim.request or b"{}")
    parent = request.get("traceparent")
    attributes = {"streamgate.job.id": job_id}
    tracing.record(
        "streamgate.queue",
        parent=parent,
        start_ns=claim.queued_ms * 1_000_000,
        end_ns=claim.claimed_ms * 1_000_000,
        attributes=attributes,
    )
    attributes["streamgate.attempt"] = owner
    with tracing.span(
        "streamgate.job", parent=parent, kind="CONSUMER", attributes=attributes
    ) as span:
        return await _answer(ctx, job_id, request, claim.key, opening, prepared, span)


async def _answer(
    ctx: dict[str, Any],
    job_id: str,
    request: dict[str, Any],
    identity: str,
    opening: Opening | None,
    prepared: tuple[Role, Toolbox, list[dict[str, Any]]] | None,
    span: Span | None,
) -> str:
    """Run a claimed job to its one final event (or hand it back); ``identity``: the digest
    of the API key that created it, whose usage it counts."""
    settings: Settings = ctx["settings"]
    log: EventLog = ctx["event_log"]
    heartbeat: Heartbeat = ctx["heartbeat"]
    upstream: Upstream = ctx["upstream"]
    metrics: WorkerMetrics = ctx["metrics"]
    agent: Agent = ctx["agent"]
    owner: str = ctx["owner"]
    if request.get("session"):
        await ctx["sessions"].refresh(request["session"], job_id)
    history: list[dict[str, Any]] = []
    if prepared is None:
        if request.get("session"):
            history = await ctx["sessions"].history(request["session"])
        prepared = _prepared(ctx, request, history)
    role, toolbox, messages = prepared
    if span is not None:
        span.set_attribute("streamgate.role", role.name)
    asked = AgentRequest(
        job_id,
        messages,
        history,
        role,
        toolbox,
        upstream,
        params=request.get("params") or {},
        client_tools=request.get("tools"),
    )
    publisher = ctx["batcher"].publisher(job_id, owner)
    final: ev.Event | None = None
    turn: Turn | None = None
    stopped_from_outside = False  # cancelled, or taken over: the final is not this attempt's
    written = False
    metrics.running.inc()
    with heartbeat.track(job_id, owner, watched=request.get("kind") == "get") as running:
        try:
            events = agent(asked, opened=opening) if opening is not None else agent(asked)  # type: ignore[call-arg]
            text, done = await relay_agent(
                events, publisher, metrics, settings.tool_output_max_chars
            )
            if settings.log_prompts:
                prompt = request.get("prompt") or request.get("messages")
                logger.info("job %s prompt %r answer %r", job_id, prompt, text)
            if request.get("session") and "prompt" in request:
                # Written with `done`: a client that asks again at once sees this turn.
                turn = ctx["sessions"].turn(request["session"], request["prompt"], text)
            final = done
        except AgentError as exc:
            logger.warning("job %s: the agent stopped: %s", job_id, exc)
            final = ev.Error(str(exc) or "the agent could not answer")
        except UpstreamError as exc:
            metrics.upstream_errors.labels(exc.kind).inc()
            logger.warning("job %s: %s", job_id, exc.detailed)
            final = ev.Error(exc.detailed if settings.expose_error_details else exc.message)
        except Fenced:
            final = None  # ended from outside: its final event is already written
            stopped_from_outside = True
        except asyncio.CancelledError:
            running.closing = True
            asked.cancelled.set()
            if running.stop_reason == "unwatched":
                final = ev.Error(ev.CLIENT_GONE)
            elif ctx.get("timed_out") and running.stop_reason is None:
                running.stop_reason = "timeout"
                final = ev.Error(
                    f"the answer took longer than JOB_TIMEOUT_S ({settings.job_timeout_s:g} s)"
                    " and was stopped; it is incomplete"
                )
            elif running.stop_reason is None:
                # Shutdown. Before any output the job goes back to the queue, to run again
                # elsewhere; after output a re-run would repeat text.
                handed_back = await log.release(job_id, owner)
                if handed_back > 0:
                    logger.info("job %s handed back to the queue before any output", job_id)
                    running.stop_reason = "handed back"
                elif handed_back == 0:
                    final = ev.Error("the worker stopped mid-answer; the answer is incomplete")
                else:
                    running.stop_reason = "too many attempts"  # it has ended, with an error
                    metrics.jobs.labels("error").inc()
        except Exception:
            logger.exception("job %s failed", job_id)
            final = ev.Error("the worker failed unexpectedly; see its logs")
        finally:
            running.closing = True
            asked.cancelled.set()  # for threads an agent left running
            if opening is not None:
                await upstream.abandon(opening)  # closed already, unless stopped before reading
            metrics.running.dec()
            usage = final.usage if isinstance(final, ev.Done) else _valid_usage(asked.spent)
            used = UsageRecord(identity, upstream.model, usage)
            if final is not None:
                closing = Closing(turn, used)  # a turn comes only with `done`
                written = await _publish_final(publisher, final, closing)
                if publisher.final_replaced:
                    final = ev.Error(UNPUBLISHABLE)  # what its stream ends with instead
                if written:
                    metrics.jobs.labels(_outcome(final, running.stop_reason)).inc()
                    metrics.count_usage(used)
                elif publisher.fenced:  # ended from outside just before its final event
                    final, stopped_from_outside = None, True
            if stopped_from_outside or running.stop_reason == "not-owner":
                await _count_stopped(log, job_id, used, metrics)
            if request.get("session"):  # freed only once the job has its final event
                await ctx["sessions"].unlock(request["session"], job_id)
    # Returning, rather than raising CancelledError, keeps arq from running the job again
    # itself: it has ended, or it is queued again under a new id.
    outcome = (
        _outcome(final, running.stop_reason) if final is not None else running.stop_reason
    ) or ("ended from outside" if stopped_from_outside else "stopped")
    if final is not None and not written:
        outcome = "final event not written"  # the gateways end it: its heartbeat lapses
    logger.info("job %s finished: %s", job_id, outcome)
    if span is not None:
        span.set_attribute("streamgate.outcome", outcome)
        if isinstance(final, ev.Error):
            tracing.failed(span, final.message, outcome)
    return outcome


async def _hand_back_if_claimed(
    claim: asyncio.Future[Claim], log: EventLog, job_id: str, owner: str
) -> None:
    """Stopped while the claim was on its way: if it made this attempt the owner, hand the
    job back now rather than leave it to the gateways once the heartbeat lapses."""
    with contextlib.suppress(Exception):
        if (await claim).result == "run" and await log.release(job_id, owner) > 0:
            logger.info("job %s handed back to the queue before any output", job_id)


async def _count_stopped(
    log: EventLog, job_id: str, used: UsageRecord, metrics: WorkerMetrics
) -> None:
    """A job cancelled from outside counts what its agent's completed requests reported, or
    as unknown when one was in flight; once."""
    try:
        if await log.count_stopped(job_id, used):
            metrics.count_usage(used)
    except Exception as exc:
        logger.warning("job %s: could not count its usage: %s", job_id, exc)


async def _publish_final(publisher: Publisher, final: ev.Event, closing: Closing) -> bool:
    """Publish the final event (with the session's turn and the job's usage); a Redis
    failure is logged, not raised, so the job's clean-up still runs (a gateway then ends
    the stream)."""
    try:
        return await publisher.close(final, closing)
    except Exception as exc:
        logger.error("job %s: could not publish its final event: %s", publisher.job_id, exc)
        return False


def _outcome(final: ev.Event, stop_reason: str | None) -> str:
    if stop_reason == "timeout":
        return "timeout"
    if isinstance(final, ev.Done):
        return "done"
    return (
        "cancelled" if isinstance(final, ev.Error) and final.message == ev.CLIENT_GONE else "error"
    )


def _prepared(
    ctx: dict[str, Any], request: dict[str, Any], history: list[dict[str, Any]]
) -> tuple[Role, Toolbox, list[dict[str, Any]]]:
    """The request's role, the tools that role offers, and the messages for the model."""
    role = role_for(ctx["roles"], request)
    return role, ctx["tools"].offered(role.tools), messages_for(role, request, history)


def role_for(roles: Roles, request: dict[str, Any]) -> Role:
    role = roles.get(request.get("role"))
    if role is None:
        logger.warning(
            "role %r is not in this worker's ROLES_FILE; using the default role "
            "(gateway and worker should read the same file)",
            request.get("role"),
        )
        role = roles.get(None)
    assert role is not None  # the default role always exists; the gateway checked the name
    return role


def messages_for(
    role: Role, request: dict[str, Any], history: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The role's system prompt, the session's earlier turns, then the prompt (or the
    client's whole conversation, from the OpenAI API)."""
    return [
        {"role": "system", "content": role.system_prompt},
        *history,
        *(request.get("messages") or [{"role": "user", "content": request["prompt"]}]),
    ]


async def relay_agent(
    events: AsyncIterator[ev.Event | str | dict[str, Any]],
    publisher: Publisher,
    metrics: WorkerMetrics,
    output_max_chars: int = 20_000,
) -> tuple[str, ev.Done]:
    """Publish what an agent yields, up to its ``Done``: the final answer's text (what
    follows its last tool round) and that ``Done``."""
    text: list[str] = []
    task = asyncio.current_task()
    try:
        async for item in events:
            if task is not None and task.cancelling():
                raise asyncio.CancelledError  # an agent that swallowed its cancel stops here
            if isinstance(item, dict):
                event = event_of(item)
            else:
                event = ev.Token(item) if isinstance(item, str) else item
            if isinstance(event, ev.Done):
                return "".join(text), _with_valid_usage(checked(event))
            if not isinstance(event, AGENT_EVENTS):
                raise TypeError(f"the agent yielded {item!r}, which is not an event it may send")
            checked(event)
            if isinstance(event, ev.Token):
                if not event.text:
                    continue  # the contract sends no empty tokens
                text.append(event.text)
                metrics.tokens.inc()
            elif isinstance(event, ev.ToolsCalled):
                text.clear()  # what came before the tools is not the answer
                event = ev.ToolsCalled([_capped(c, output_max_chars) for c in event.calls])
            publisher.emit(event)
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
    return "".join(text), ev.Done()


MAX_TOKENS = 2**53  # a count Redis's HINCRBY and JSON both hold exactly


def _with_valid_usage(done: ev.Done) -> ev.Done:
    """An agent's ``Done`` whose usage is not whole token counts reports none."""
    usage = _valid_usage(done.usage)
    return done if usage is done.usage else dataclasses.replace(done, usage=usage)


def _valid_usage(usage: object) -> ev.Usage | None:
    """What an agent reported, if it is whole token counts; else none: a count of unknown,
    rather than a wrong one in ``done`` and in the key's usage."""
    if usage is None:
        return None
    if isinstance(usage, ev.Usage):
        counts = (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)
        if all(type(n) is int and 0 <= n <= MAX_TOKENS for n in counts):
            return usage
    logger.warning("the agent reported usage %r, not whole token counts; dropped", usage)
    return None


def _capped(call: ev.ToolResult, limit: int) -> ev.ToolResult:
    """An agent's own tool output, capped as the toolbox caps outputs."""
    output = cap_output(call.output, limit)
    if output is call.output:
        return call
    return ev.ToolResult(call.call_id, call.name, call.arguments, output)
