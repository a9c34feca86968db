"""OpenTelemetry traces of every job, across the queue: off, and free, unless configured.

With ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) set, each
process exports its spans over OTLP (``OTEL_EXPORTER_OTLP_PROTOCOL``: ``http/protobuf``, the
default, or ``grpc``), and the SDK reads the other standard ``OTEL_*`` variables itself
(headers, sampler, batch delays, resource attributes). ``OTEL_SDK_DISABLED=true`` or
``OTEL_TRACES_EXPORTER=none`` turn it off.

Off, nothing of the SDK is imported and every helper here returns at its first line: no
span objects, no context, no attributes built (``enabled()`` guards the callers' own work).

A job's trace context travels inside the job (its request's ``traceparent``, W3C), so the
worker's spans join the gateway's, and a client's own ``traceparent`` makes the job part of
the client's trace.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, SpanKind, Tracer

_provider: TracerProvider | None = None
_tracer: Tracer | None = None


def wanted() -> bool:
    """Whether the environment asks for traces."""
    env = os.environ
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    disabled = env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    no_exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none"
    return bool(endpoint) and not disabled and not no_exporter


def setup(service: str) -> bool:
    """Start exporting this process's spans as ``service`` (unless ``OTEL_SERVICE_NAME``
    names it) if the environment asks for traces; returns whether it does."""
    global _provider, _tracer
    if not wanted() or _tracer is not None:
        return _tracer is not None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = os.environ.get("OTEL_SERVICE_NAME") or service
    _provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    _provider.add_span_processor(BatchSpanProcessor(_exporter()))
    _tracer = _provider.get_tracer("streamgate")
    from opentelemetry import trace

    # Global too: libraries instrumented with the API (the MCP SDK's calls) join the trace.
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(_provider)
    return True


def _exporter() -> Any:
    env = os.environ
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if protocol.strip().lower() == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    return HttpExporter()


def shutdown() -> None:
    """Send what is buffered (at exit)."""
    global _provider, _tracer
    if _provider is not None:
        _provider.shutdown()
    _provider = _tracer = None


def enabled() -> bool:
    return _tracer is not None


def _kind(name: str) -> SpanKind:
    from opentelemetry.trace import SpanKind

    return SpanKind[name]


def _parent(traceparent: str | None) -> Any:
    """The context a W3C ``traceparent`` names (None: none, or the current one)."""
    if not traceparent:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})


def _links(traceparents: Sequence[str | None]) -> list[Any]:
    from opentelemetry.trace import Link, get_current_span

    links = []
    for traceparent in traceparents:
        context = _parent(traceparent)
        if context is not None:
            linked = get_current_span(context).get_span_context()
            if linked.is_valid:
                links.append(Link(linked))
    return links


def start(
    name: str,
    *,
    parent: str | None = None,
    kind: str = "INTERNAL",
    attributes: dict[str, Any] | None = None,
    links: Sequence[str | None] = (),
    start_ns: int | None = None,
) -> Span | None:
    """A span that is not made current (for an async generator, whose body runs in its
    consumer's context): a child of ``parent`` (a ``traceparent``) if given, else of the
    current span; linked to the spans ``links`` name; the caller ends it. None when off."""
    if _tracer is None:
        return None
    return _tracer.start_span(
        name,
        context=_parent(parent),
        kind=_kind(kind),
        attributes=attributes,
        links=_links(links),
        start_time=start_ns,
    )


@contextmanager
def span(
    name: str,
    *,
    parent: str | None = None,
    kind: str = "INTERNAL",
    attributes: dict[str, Any] | None = None,
) -> Iterator[Span | None]:
    """``start``'s span, current inside the block and ended with it. None when off."""
    started = start(name, parent=parent, kind=kind, attributes=attributes)
    if started is None:
        yield None
        return
    from opentelemetry.trace import use_span

    with use_span(started, end_on_exit=True) as current:
        yield current


def record(
    name: str,
    *,
    parent: str | None,
    start_ns: int,
    end_ns: int,
    attributes: dict[str, Any] | None = None,
) -> None:
    """A span of something that already happened, timed by the caller (a queue wait, on
    Redis's clock)."""
    done = start(name, parent=parent, attributes=attributes, start_ns=start_ns)
    if done is not None:
        done.end(end_time=end_ns)


def traceparent(of: Span | None = None) -> str | None:
    """The W3C ``traceparent`` of ``of`` (or of the current span); None when off or none."""
    if _tracer is None:
        return None
    from opentelemetry.trace import get_current_span

    context = (of or get_current_span()).get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def annotate(attributes: dict[str, Any]) -> None:
    """Set attributes on the current span (when on)."""
    if _tracer is None:
        return
    from opentelemetry.trace import get_current_span

    get_current_span().set_attributes(attributes)


def note(name: str, attributes: dict[str, Any]) -> None:
    """An event on the current span (when on): something it went through."""
    if _tracer is None:
        return
    from opentelemetry.trace import get_current_span

    get_current_span().add_event(name, attributes)


def failed(current: Span | None, error: BaseException | str, kind: str | None = None) -> None:
    """Mark a span failed, saying why."""
    if current is None:
        return
    from opentelemetry.trace import Status, StatusCode

    current.set_status(Status(StatusCode.ERROR, str(error)))
    current.set_attribute("error.type", kind or type(error).__name__)
