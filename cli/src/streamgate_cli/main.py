"""``streamgate``: chat with a Streamgate gateway, or follow a job, from the terminal.

    streamgate chat "prompt" [--session ID] [--role NAME]
    streamgate events JOB_ID [--after CURSOR]

Both take ``--url`` (default ``$STREAMGATE_URL``, else http://127.0.0.1:8000),
``--api-key`` (default ``$STREAMGATE_API_KEY``, sent as ``Authorization: Bearer``) and
``--json`` (one ``{"id": ..., "data": {...}}`` line per event instead of text), before or
after the command name. Exit statuses are listed in follow.py.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Sequence
from importlib.metadata import version
from typing import Any, TextIO

import httpx

from .client import TIMEOUT, CliError, EventStream
from .follow import EXIT_INTERRUPTED, EXIT_REQUEST_FAILED, follow, follow_chat
from .render import JsonRenderer, Renderer, TextRenderer

DEFAULT_URL = "http://127.0.0.1:8000"


def _base_url(value: str) -> str:
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not a URL: {exc}") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise argparse.ArgumentTypeError(f"{value!r} is not an http:// or https:// URL")
    return value


def _add_common(parser: argparse.ArgumentParser, with_defaults: bool) -> None:
    # The subcommands repeat the options with SUPPRESS defaults, so that an option given
    # before the command name is not overwritten by the subcommand's default.
    def default(value: Any) -> Any:
        return value if with_defaults else argparse.SUPPRESS

    parser.add_argument(
        "--url",
        type=_base_url,
        default=default(os.environ.get("STREAMGATE_URL") or DEFAULT_URL),
        help=f"the gateway (default: $STREAMGATE_URL, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--api-key",
        default=default(os.environ.get("STREAMGATE_API_KEY") or None),
        help="sent as 'Authorization: Bearer KEY' (default: $STREAMGATE_API_KEY)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help='print each event as a JSON line {"id": ..., "data": {...}} instead of text',
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamgate", description="Chat with a Streamgate gateway from the terminal."
    )
    _add_common(parser, with_defaults=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chat = commands.add_parser("chat", help="ask a question and print the answer as it streams")
    chat.add_argument("prompt", help="what to ask")
    chat.add_argument("--session", help="keep memory between chats under this id")
    chat.add_argument("--role", help="the named system prompt to use (see GET /roles)")
    _add_common(chat, with_defaults=False)
    events = commands.add_parser("events", help="follow an existing job's events")
    events.add_argument("job_id", metavar="JOB_ID", help="the job id (from POST /chat)")
    events.add_argument("--after", metavar="CURSOR", help="start after this event id")
    _add_common(events, with_defaults=False)
    return parser


def run(
    argv: Sequence[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """Run one command; its exit status."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    args = build_parser().parse_args(argv)
    for name in ("prompt", "session", "role", "job_id", "after", "api_key"):
        value = getattr(args, name, None)
        if isinstance(value, str) and not _is_utf8(value):
            # What the shell passed holds bytes no UTF-8 text has (surrogate-escaped).
            print(f"error: the {name.replace('_', ' ')} is not valid UTF-8 text", file=err)
            return EXIT_REQUEST_FAILED
    headers = {"User-Agent": f"streamgate-cli/{version('streamgate-cli')}"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    renderer: Renderer = JsonRenderer(out) if args.json else TextRenderer(out, out.isatty())

    def on_retry(message: str) -> None:
        print(f"streamgate: {message}", file=err, flush=True)

    with httpx.Client(base_url=args.url, headers=headers, timeout=TIMEOUT) as client:
        try:
            if args.command == "chat":
                params = {"prompt": args.prompt}
                for name in ("session", "role"):
                    if getattr(args, name) is not None:
                        params[name] = getattr(args, name)
                stream = EventStream(client, "/chat", params, on_retry=on_retry)
                return follow_chat(client, stream, renderer, err)
            stream = EventStream(
                client,
                f"/chat/{args.job_id}/events",
                job_id=args.job_id,
                after=args.after,
                on_retry=on_retry,
            )
            return follow(stream, renderer, err)
        except CliError as exc:
            renderer.end_line()
            print(f"error: {exc}", file=err)
            return EXIT_REQUEST_FAILED
        except KeyboardInterrupt:
            renderer.end_line()
            return EXIT_INTERRUPTED


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def main() -> None:
    # An answer may hold characters the terminal cannot show (or lone surrogates): show
    # a replacement rather than die mid-answer.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="replace")
    try:
        code = run()
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, and keep Python from complaining
        # again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    raise SystemExit(code)


if __name__ == "__main__":
    main()
