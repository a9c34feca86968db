"""The worker's Prometheus metrics, served on METRICS_PORT by each worker process, with
its liveness (``/healthz``) beside them.

Every process has its own registry and port (one container each under compose), so two
workers never write over each other's figures; Prometheus adds them up. The listener runs
in a thread, so it answers even when the worker's event loop is stuck: ``/healthz`` then
says so (503), for an orchestrator to restart the process.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from shared.event_log import UsageRecord

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.background_restarts = Counter(
            "streamgate_background_restarts_total",
            "Background loops started again after a failure (shared/supervise.py)",
            ["loop"],
            registry=r,
        )
        self.jobs = Counter(
            "streamgate_jobs_total",
            "Jobs by how they ended, counted by the process that wrote the final event",
            ["outcome"],
            registry=r,
        )
        self.running = Gauge("streamgate_running_jobs", "Jobs running in this worker", registry=r)
        self.tokens = Counter(
            "streamgate_tokens_published_total",
            "Tokens received from the LLM and published",
            registry=r,
        )
        self.upstream_first_token = Histogram(
            "streamgate_upstream_first_token_seconds",
            "From sending the LLM request to its first token or tool call",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "streamgate_upstream_errors_total",
            "Failed LLM requests by kind",
            ["kind"],
            registry=r,
        )
        self.tool_calls = Counter(
            "streamgate_tool_calls_total",
            "Tool calls by tool and outcome",
            ["tool", "outcome"],
            registry=r,
        )
        self.usage_tokens = Counter(
            "streamgate_usage_tokens_total",
            "Tokens the upstream reported, by API key (a digest) and model",
            ["key", "model", "type"],
            registry=r,
        )
        self.usage_jobs = Counter(
            "streamgate_usage_jobs_total",
            "Jobs by API key (a digest), model, and whether the upstream reported their usage",
            ["key", "model", "usage"],
            registry=r,
        )

    def count_usage(self, used: UsageRecord) -> None:
        """A job's usage, once its final event is written. The key is named by the first
        12 hex digits of its SHA-256 (``-`` without keys), never by the key itself."""
        key = used.identity[:12] or "-"
        usage = used.usage
        if usage is None:
            self.usage_jobs.labels(key, used.model, "unknown").inc()
            return
        self.usage_jobs.labels(key, used.model, "reported").inc()
        self.usage_tokens.labels(key, used.model, "prompt").inc(usage.prompt_tokens)
        self.usage_tokens.labels(key, used.model, "completion").inc(usage.completion_tokens)
        self.usage_tokens.labels(key, used.model, "total").inc(usage.total_tokens)

    def serve(self, port: int, host: str, alive: Callable[[], bool] = lambda: True) -> None:
        """``/metrics`` and ``/healthz`` (200 while ``alive()``, else 503) on ``port``."""
        if not port:
            return
        metrics = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("PATH_INFO") != "/healthz":
                scraped: Iterable[bytes] = metrics(environ, start_response)
                return scraped
            if alive():
                start_response("200 OK", [("Content-Type", "application/json")])
                return [b'{"status":"ok"}']
            start_response("503 Service Unavailable", [("Content-Type", "application/json")])
            return [b'{"error":"the worker\'s event loop has not run its heartbeat lately"}']

        try:
            server = make_server(host, port, app, _ThreadingServer, handler_class=_Quiet)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                # Several workers on one host (a local run) cannot share a port; the first wins.
                logger.warning("metrics not served: port %d is taken; set METRICS_PORT", port)
            else:
                logger.error(
                    "metrics not served: cannot listen on HOST %r, port %d (%s); set HOST to"
                    " an address of this machine (0.0.0.0 for every one)",
                    host,
                    port,
                    exc.strerror or exc,
                )
        else:
            threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
            logger.info("metrics on http://%s:%d/metrics", host, port)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # every scrape would be a log line
