"""``python -m gateway``: serve the gateway on $PORT (default 8000) with uvicorn."""

from __future__ import annotations

import uvicorn

from shared.gc_tuning import tune_gc
from shared.logs import configure_logging, uvicorn_log_config
from shared.settings import load_address, load_settings
from shared.shards import require_places

from .app import create_app
from .http_protocol import protocol_for


def main() -> None:
    settings = load_settings()
    address = load_address(default_port=8000)
    configure_logging(settings.log_level, settings.log_format)
    require_places(settings.redis_url)
    app = create_app(settings)
    tune_gc()
    uvicorn.run(
        app,
        host=address.host,
        port=address.port,
        log_level=settings.log_level.lower(),
        log_config=uvicorn_log_config(settings.log_level),
        # Streams close at once on SIGTERM (sse-starlette); this bounds the rest.
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s)),
        access_log=False,
        http=protocol_for(settings),
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=settings.forwarded_allow_ips or None,
    )


if __name__ == "__main__":
    main()
