"""The web chat page in a real browser (Debian's chromium via Playwright) against a real stack.

The page must stream over the browser's own EventSource, so these tests drive a browser rather
than a JavaScript test runner: reconnects, Last-Event-ID and CORS are the browser's doing.
Events the demo model cannot produce yet (tool calls) go through ``window.streamgate``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Locator,
    Page,
    Request,
    Route,
    expect,
    sync_playwright,
)

from shared import keys
from shared.events import CLIENT_GONE

from .harness import ROOT, Service, Stack, wait_until
from .test_chat_stream import HARD_TEXT

CHROMIUM = os.environ.get("STREAMGATE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = ROOT / "artifacts" / "screenshots" / "chat-mid-stream.png"
SESSION = re.compile(r"[A-Za-z0-9_-]{1,64}")
EVENTSOURCE_CLOSED = 2
IN_FLIGHT = "streamgate.inFlight"  # the sessionStorage key of the answer a reload resumes
API_KEY = "sg-test-key-0123"


def _chromium() -> str:
    # chromium may still be being installed when the suite starts: give it a minute.
    deadline = time.monotonic() + 60
    while True:
        found = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.skip(
                f"no chromium at {CHROMIUM}: apt-get install chromium, or set STREAMGATE_CHROMIUM"
            )
        time.sleep(2)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = _chromium()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        launched.close()


@pytest.fixture
def open_page(browser: Browser) -> Iterator[Callable[..., Page]]:
    """A factory of pages, each in a fresh context (own localStorage); no page may throw."""
    contexts: list[BrowserContext] = []
    errors: list[Exception] = []

    def open_(url: str, **context_options: Any) -> Page:
        context = browser.new_context(**context_options)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(10_000)
        page.on("pageerror", lambda error: errors.append(error))
        page.goto(url)
        return page

    yield open_
    for context in contexts:
        context.close()
    assert not errors, f"the page threw: {errors}"


@pytest.fixture(scope="module")
def own_gateway(stack: Stack) -> Iterator[Service]:
    """One more gateway on the shared stack: CORS allows only another origin, and a reader
    may stay away long. The reconnect test kills and restarts it, never the shared one.
    """
    gateway = stack.add_gateway(CORS_ALLOW_ORIGINS="https://other.example", DISCONNECT_GRACE_S="30")
    yield gateway
    gateway.stop()
    stack.gateways.remove(gateway)


@pytest.fixture(scope="module")
def keyed_gateway(stack: Stack) -> Iterator[Service]:
    """One more gateway on the shared stack that wants an API key."""
    gateway = stack.add_gateway(API_KEYS=API_KEY)
    yield gateway
    gateway.stop()
    stack.gateways.remove(gateway)


@pytest.fixture
def page(open_page: Callable[..., Page], stack: Stack) -> Page:
    return open_page(stack.gateway.url)


def chat_requests(page: Page) -> list[Request]:
    """Every GET /chat?... the page makes from now on (EventSource reconnects included)."""
    seen: list[Request] = []
    page.on("request", lambda r: seen.append(r) if urlsplit(r.url).path == "/chat" else None)
    return seen


def query(request: Request) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(request.url).query).items()}


def send(page: Page, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")


def answer(page: Page) -> Locator:
    return page.locator(".msg.assistant").last


def wait_state(page: Page, state: str, timeout: float = 10_000) -> Locator:
    last = answer(page)
    expect(last).to_have_attribute("data-state", state, timeout=timeout)
    return last


def source_closed(page: Page) -> bool:
    closed: bool = page.evaluate(
        f"window.streamgate.lastSource.readyState === {EVENTSOURCE_CLOSED}"
    )
    return closed


def test_streams_the_answer_and_closes(page: Page) -> None:
    expect(page.locator("#prompt")).to_have_accessible_name("Message")
    send(page, "hello [delay 0.03]")
    last = answer(page)
    expect(last).to_have_attribute("data-state", "streaming")
    expect(page.locator("#send")).to_be_disabled()
    expect(last.locator(".answer .text")).to_contain_text("Streamgate demo")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))
    print(f"screenshot: {SCREENSHOT.relative_to(ROOT)}")
    assert page.evaluate("window.streamgate.streaming")

    wait_state(page, "done")
    assert 'You said: "hello [delay 0.03]"' in (last.locator(".answer").text_content() or "")
    assert source_closed(page)
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator(".msg.user").last).to_have_text("hello [delay 0.03]")


def raw(answer: Locator) -> str:
    """Every token the answer got, as sent (the page renders them as Markdown)."""
    text: str = answer.evaluate("e => e.streamgateRaw")
    return text


def test_a_prompt_is_text_and_an_answer_keeps_every_token(page: Page) -> None:
    send(page, "<b>bold</b> <img src=x onerror=alert(1)>")
    wait_state(page, "done")
    user = page.locator(".msg.user").last
    assert user.locator("b, img").count() == 0
    assert user.text_content() == "<b>bold</b> <img src=x onerror=alert(1)>"

    send(page, "[hard]")
    last = wait_state(page, "done")
    assert raw(last) == HARD_TEXT


def test_markdown_renders_as_it_streams(page: Page) -> None:
    send(page, "[markdown] [delay 0.02]")
    last = wait_state(page, "done")
    body = last.locator(".answer")
    expect(body.locator("h1")).to_have_text("A heading")
    expect(body.locator("ul > li")).to_have_text(["one", "two", "three"])
    expect(body.locator("pre code")).to_have_text("print('hello')\n")
    expect(body.locator("pre button.copy-code")).to_have_text("Copy")
    expect(body.locator("table tr")).to_have_count(3)
    expect(body.locator("table td").first).to_have_text("a")
    link = body.locator("a")
    expect(link).to_have_attribute("href", "https://example.com/")
    expect(link).to_have_attribute("target", "_blank")
    assert "noopener" in (link.get_attribute("rel") or "")


def test_html_in_an_answer_is_shown_as_text_and_never_runs(page: Page) -> None:
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    send(page, "[html]")
    last = wait_state(page, "done")
    shown = last.locator(".answer").inner_text()
    assert '<img src=x onerror="window.__pwned = 1">' in shown
    assert "<script>window.__pwned = 2</script>" in shown
    assert last.locator(".answer img, .answer script, .answer a").count() == 0
    send(page, "Wrap it in a <div> and load it with a <script> tag.")
    last = wait_state(page, "done")
    assert "<div> and load it with a <script> tag." in last.locator(".answer").inner_text()
    page.wait_for_timeout(300)  # an image's error event would have fired by now
    assert page.evaluate("window.__pwned") is None
    assert dialogs == []
    assert page.locator(".log script, .log [onerror], .log [onclick]").count() == 0


@pytest.mark.parametrize("path", ["/", "/static/index.html"])
def test_the_page_has_a_content_security_policy(stack: Stack, path: str) -> None:
    response = httpx.get(stack.gateway.url + path)
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "'unsafe-inline'" not in policy
    assert "img-src data:" in policy and "media-src 'none'" in policy
    assert "<script>" not in response.text  # no inline script: every script is a file


@pytest.mark.parametrize(
    ("text", "cut"),
    [
        ("one\n\ntwo\n", "one\n\n"),
        ("one\n\ntw", ""),  # the line after the blank one is not complete yet
        ("```\na\n\nb\n```\n\nc\n", "```\na\n\nb\n```\n\n"),
        ("````md\n```python\nx\n```\n\n# not a heading\n", ""),  # still inside ````
        ("- item\n\n    indented code\n", ""),  # an indented line may continue the item
        ("~~~\na\n```\n\nb\n", ""),  # ``` does not close ~~~
    ],
)
def test_the_renderer_keeps_only_what_cannot_change(page: Page, text: str, cut: str) -> None:
    end = page.evaluate("t => window.streamgateMarkdown.stableEnd(t)", text)
    assert text[:end] == cut


def test_the_log_follows_a_fast_answer(page: Page) -> None:
    send(page, "[long 600] [delay 0.002]")
    wait_state(page, "done", timeout=30_000)
    gap = page.evaluate("() => { const l = document.getElementById('log');"
                        " return l.scrollHeight - l.scrollTop - l.clientHeight; }")  # fmt: skip
    assert gap < 48


def test_the_vendored_libraries_are_the_stated_builds() -> None:
    vendor = ROOT / "services" / "gateway" / "src" / "gateway" / "static" / "vendor"
    stated = (vendor / "README.md").read_text()
    for name in ("marked.umd.js", "purify.min.js"):
        digest = hashlib.sha256((vendor / name).read_bytes()).hexdigest()
        assert f"`{digest}`" in stated, f"{name} is not the build README.md names"
    assert (vendor / "marked.umd.js").read_text().startswith("/**\n * marked v18.2.1")
    assert "DOMPurify 3.4.18" in (vendor / "purify.min.js").read_text()[:200]


def test_an_upstream_error_is_shown_in_words(page: Page) -> None:
    send(page, "[http 500]")
    last = wait_state(page, "error")
    notice = last.locator(".notice.error")
    expect(notice).to_contain_text("Error: ")
    assert len((notice.text_content() or "").split()) >= 3, "the error is told in words"
    assert source_closed(page)
    expect(page.locator("#send")).to_be_enabled()


def test_stop_cancels_a_slow_answer(page: Page) -> None:
    deletes: list[str] = []
    page.on("request", lambda r: deletes.append(r.url) if r.method == "DELETE" else None)
    send(page, "[long 200] [delay 0.05]")
    last = answer(page)
    expect(last.locator(".answer .text")).to_contain_text("3")
    page.click("#stop")
    wait_state(page, "stopped", timeout=5_000)
    expect(last.locator(".notice.stopped")).to_have_text("Stopped.")
    expect(page.locator("#status")).to_have_text("stopped")
    job_id = last.get_attribute("data-job-id")
    assert job_id and deletes == [f"{page.url.rstrip('/')}/chat/{job_id}"]
    assert source_closed(page)
    shown = last.locator(".answer").text_content()
    page.wait_for_timeout(300)
    assert last.locator(".answer").text_content() == shown, "nothing arrives after stop"


def test_follow_ups_share_the_session_and_new_chat_makes_another(page: Page) -> None:
    requests = chat_requests(page)
    send(page, "first")
    wait_state(page, "done")
    send(page, "second [echo]")  # the demo model answers with the messages it was sent
    last = wait_state(page, "done")
    expect(last).to_contain_text('"content":"first"')  # the server remembered the session
    assert [query(r)["prompt"] for r in requests] == ["first", "second [echo]"]
    first, second = (query(r)["session"] for r in requests)
    assert SESSION.fullmatch(first)
    assert first == second == page.evaluate("localStorage.getItem('streamgate.session')")

    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)
    send(page, "third")
    wait_state(page, "done")
    third = query(requests[-1])["session"]
    assert SESSION.fullmatch(third)
    assert third != first

    page.reload()  # the session outlives a reload
    assert page.evaluate("window.streamgate.session") == third


def test_works_from_its_own_origin_when_cors_is_restricted(
    own_gateway: Service, open_page: Callable[..., Page]
) -> None:
    page = open_page(own_gateway.url)
    expect(page.locator("#role")).to_be_visible()  # fetch() of /roles
    send(page, "[long 100] [delay 0.02]")  # EventSource
    expect(answer(page).locator(".answer .text")).to_contain_text("t3")
    page.click("#stop")  # a DELETE, which browsers send with an Origin header
    wait_state(page, "stopped", timeout=5_000)


def test_reconnects_and_resumes_the_same_job(
    stack: Stack, own_gateway: Service, open_page: Callable[..., Page]
) -> None:
    page = open_page(own_gateway.url)
    requests = chat_requests(page)
    before = stack.llm_stats()["requests"]
    send(page, "[long 60] [delay 0.05]")
    last = answer(page)
    expect(last.locator(".answer .text")).to_contain_text("3")

    own_gateway.kill()  # the connection drops mid-answer
    expect(page.locator("#status")).to_have_text("reconnecting…", timeout=5_000)
    own_gateway.proc.wait()  # type: ignore[union-attr]
    own_gateway.start()

    wait_state(page, "done", timeout=15_000)
    expected = "".join(f"t{i} " for i in range(60))
    assert raw(last) == expected, "nothing lost or repeated"
    expect(last.locator(".answer")).to_have_text(expected.strip())  # and all of it shown
    assert stack.llm_stats()["requests"] == before + 1, "one job, resumed, not a second one"
    assert len(requests) >= 2
    assert all(r.url == requests[0].url for r in requests), "the browser resumes the same URL"
    assert requests[1].all_headers().get("last-event-id")


def test_phone_viewport_has_no_horizontal_scroll(
    open_page: Callable[..., Page], stack: Stack
) -> None:
    page = open_page(
        stack.gateway.url, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
    )
    send(page, "x" * 200 + " " + "y " * 40)
    wait_state(page, "done")
    widths = page.evaluate(
        "[document.documentElement.scrollWidth, document.body.scrollWidth, window.innerWidth]"
    )
    assert max(widths[:2]) <= widths[2], widths
    for selector in ("#prompt", "#send", "#new-chat"):
        box = page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, selector
        assert box["y"] + box["height"] <= 844, f"{selector} is off screen"


def test_tool_calls_render_as_chips(page: Page) -> None:
    page.evaluate("""() => {
        const sg = window.streamgate;
        sg.handleEvent({lifecycle: "started", job_id: "0123456789abcdef0123456789abcdef"});
        sg.handleEvent({token: "Let me work that out. "});
        sg.handleEvent({tool_call: {id: "call_1", name: "calculator"}});
    }""")
    chip = page.locator(".tool-chip[data-call-id='call_1']")
    expect(chip).to_have_text("calling calculator…")
    page.evaluate("""() => window.streamgate.handleEvent({tools_called: [{
        id: "call_1", name: "calculator", arguments: {expression: "2 + 3 * 4"},
        output: "14 <img src=x onerror=alert(1)>"}]})""")
    expect(chip).to_have_count(1)
    expect(chip.locator("summary")).to_have_text("calculator → 14 <img src=x onerror=alert(1)>")
    expect(chip).to_have_class(re.compile(r"\bcalled\b"))
    chip.locator("summary").click()
    expect(chip.locator(".tool-args")).to_contain_text('"expression": "2 + 3 * 4"')
    page.evaluate("""() => {
        const sg = window.streamgate;
        sg.handleEvent({something_new: true});
        sg.handleEvent({lifecycle: "thinking"});
        sg.handleEvent({token: "It is 14."});
        sg.handleEvent({lifecycle: "done"});
    }""")
    last = wait_state(page, "done")
    assert last.locator("img").count() == 0
    assert last.locator(".answer > *").evaluate_all("els => els.map(e => e.className)") == [
        "text markdown",
        "tool-chip called",
        "text markdown",
    ]


def test_tool_calls_from_the_model_show_their_output(page: Page) -> None:
    send(page, "calculate 2 + 3 * 4")
    last = wait_state(page, "done")
    chip = last.locator(".tool-chip")
    expect(chip).to_have_count(1)
    expect(chip.locator("summary")).to_have_text("calculator → 14")
    expect(last.locator(".answer .text")).to_have_text("From the tools: calculator said 14.")


def test_roles_are_offered_sent_and_remembered(page: Page) -> None:
    requests = chat_requests(page)
    role = page.locator("#role")
    expect(role).to_be_visible()
    expect(role).to_have_accessible_name("Role")
    names = role.locator("option").evaluate_all("options => options.map(o => o.value)")
    assert len(names) >= 2 and "" not in names
    page.select_option("#role", names[1])
    send(page, "who are you?")
    wait_state(page, "done")
    assert query(requests[0])["role"] == names[1]
    page.reload()
    expect(role).to_have_value(names[1])

    # A role the server does not know: the refusal comes in the server's own words.
    pirate = [{"name": "pirate", "description": "Answers like a pirate"}]
    page.route("**/roles", lambda route: route.fulfill(json=pirate))
    page.reload()
    expect(role).to_have_attribute("title", "Answers like a pirate")
    send(page, "ahoy")
    expect(answer(page).locator(".notice.error")).to_contain_text("pirate")
    assert query(requests[-1])["role"] == "pirate"

    # No roles (an older gateway answers 404): no picker, and the default role applies.
    page.unroute("**/roles")
    page.route("**/roles", lambda route: route.fulfill(status=404, json={"error": "no"}))
    page.reload()
    expect(role).to_be_hidden()


def test_asks_for_an_api_key_and_sends_it(
    keyed_gateway: Service, open_page: Callable[..., Page]
) -> None:
    page = open_page(keyed_gateway.url)
    panel = page.locator("#key-panel")
    expect(panel).to_be_visible()  # GET /roles answered 401
    expect(page.locator("#api-key")).to_have_accessible_name("API key")
    requests = chat_requests(page)
    send(page, "let me in")
    expect(page.locator("#prompt")).to_have_value("let me in")  # taken back, to send again
    expect(page.locator(".msg")).to_have_count(0)

    page.fill("#api-key", "not-the-key")
    page.press("#api-key", "Enter")
    expect(panel).to_contain_text("refused the saved API key")
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Enter")
    last = wait_state(page, "done")
    expect(last).to_contain_text('You said: "let me in"')
    expect(page.locator(".msg.user")).to_have_count(1)
    expect(page.locator("#role")).to_be_visible()  # /roles with the Bearer key
    assert query(requests[-1])["access_token"] == API_KEY
    assert page.evaluate("localStorage.getItem('streamgate.apiKey')") == API_KEY

    send(page, "[long 100] [delay 0.02]")
    expect(answer(page).locator(".answer .text")).to_contain_text("t3")
    with page.expect_response(lambda r: r.request.method == "DELETE") as deleted:
        page.click("#stop")
    assert deleted.value.status == 204
    assert deleted.value.request.all_headers()["authorization"] == f"Bearer {API_KEY}"
    wait_state(page, "stopped")


def test_a_key_saved_while_a_refused_turn_is_still_failing_sends_it_again(
    keyed_gateway: Service, open_page: Callable[..., Page]
) -> None:
    """The page learns of a refused key from ``/roles`` and from the turn's own stream,
    in either order. When ``/roles`` answers first, the user may save a good key before
    the turn has failed: the turn must still be taken for refused (its own key asked
    about, not the one saved since) and sent again with the new key. It was asked about
    with the new key, found fine, and ended as "the server would not start this answer"."""
    page = open_page(keyed_gateway.url)
    panel = page.locator("#key-panel")
    expect(panel).to_be_visible()
    held: list[Route] = []
    page.route(
        re.compile(r"/chat\?.*access_token=not-the-key"),
        lambda route: held.append(route) if route.request.method == "GET" else route.continue_(),
    )
    page.fill("#api-key", "not-the-key")
    page.press("#api-key", "Enter")
    send(page, "let me in")
    expect(panel).to_contain_text("refused the saved API key")  # /roles said so first
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Enter")
    for _ in range(200):  # handlers run while Playwright waits: wait in its own way
        if held:
            break
        page.wait_for_timeout(50)
    assert held, "the turn was never sent"
    held[0].continue_()  # now the turn sent with the old key fails: 401
    last = wait_state(page, "done")
    expect(last).to_contain_text('You said: "let me in"')
    expect(page.locator(".msg.user")).to_have_count(1)


def test_an_answer_that_cannot_be_resumed_is_reported(
    open_page: Callable[..., Page], stack: Stack
) -> None:
    # A stream that ends without a final event, then a reconnect the server refuses (404:
    # the job expired): the EventSource gives up, and the page must say so in words.
    job_id = "0123456789abcdef0123456789abcdef"
    seen: list[str] = []

    def server(route: Route) -> None:
        seen.append(route.request.method)
        if len(seen) > 1:
            route.fulfill(status=404, json={"error": f"no job {job_id}"})
            return
        body = (
            "retry: 50\n\n"
            f'id: {job_id}-1\ndata: {{"lifecycle": "queued", "job_id": "{job_id}"}}\n\n'
            f'id: {job_id}-2\ndata: {{"token": "half an ans"}}\n\n'
        )
        route.fulfill(status=200, content_type="text/event-stream", body=body)

    page = open_page("about:blank")
    page.route(re.compile(r"/chat\?"), server)
    page.goto(stack.gateway.url)
    send(page, "anything")
    last = wait_state(page, "error")
    expect(last.locator(".answer")).to_have_text("half an ans")
    expect(last.locator(".notice.error")).to_contain_text("no longer on the server")
    assert seen == ["GET", "GET", "HEAD"], "one reconnect, then a HEAD that asks why"
    assert source_closed(page)
    expect(page.locator("#send")).to_be_enabled()


def test_an_unreachable_server_is_reported(open_page: Callable[..., Page], stack: Stack) -> None:
    page = open_page("about:blank")
    page.clock.install()  # the page's give-up timer, fast-forwarded below
    page.route(re.compile(r"/chat\?"), lambda route: route.abort("connectionrefused"))
    page.goto(stack.gateway.url)
    send(page, "anyone there?")
    expect(page.locator("#status")).to_have_text("reconnecting…")
    page.clock.fast_forward(16_000)
    last = wait_state(page, "error")
    expect(last.locator(".notice.error")).to_contain_text("could not be reached")
    assert source_closed(page)


def test_a_chat_still_answering_in_another_tab_is_explained(page: Page) -> None:
    send(page, "[long 100] [delay 0.05]")
    expect(answer(page).locator(".answer .text")).to_contain_text("t3")
    other = page.context.new_page()  # the same chat (localStorage), not the same answer
    other.goto(page.url)
    send(other, "again")
    last = wait_state(other, "error")
    expect(last.locator(".notice.error")).to_contain_text("still running")
    assert answer(page).get_attribute("data-state") == "streaming", "nor is the first one taken"


def test_a_reload_mid_answer_shows_it_again_and_follows_it_to_its_end(
    page: Page, stack: Stack
) -> None:
    before = stack.llm_stats()["requests"]
    send(page, "[long 60] [delay 0.05]")
    expect(answer(page).locator(".answer .text")).to_contain_text("t3")
    job_id = answer(page).get_attribute("data-job-id")
    page.reload()
    expect(page.locator(".msg.user")).to_have_text(["[long 60] [delay 0.05]"])
    last = wait_state(page, "done")
    assert last.get_attribute("data-job-id") == job_id
    assert raw(last) == "".join(f"t{i} " for i in range(60)), "the whole answer, once"
    send(page, "next")  # the chat is free: no 409
    wait_state(page, "done")
    assert stack.llm_stats()["requests"] == before + 2
    page.reload()  # a finished answer is not brought back
    expect(page.locator(".msg")).to_have_count(0)


def test_a_tab_restored_after_the_grace_does_not_replay_its_cancelled_answer(
    page: Page, stack: Stack
) -> None:
    """Its readers gone for longer than DISCONNECT_GRACE_S, the answer was cancelled: a tab
    restored later (here: one whose leaving is set a minute back) shows no stale answer."""
    send(page, "[long 60] [delay 0.05]")
    expect(answer(page).locator(".answer .text")).to_contain_text("t3")
    page.add_init_script(
        f"""(() => {{
        const kept = JSON.parse(sessionStorage.getItem({IN_FLIGHT!r}) || "null");
        if (kept) sessionStorage.setItem(
            {IN_FLIGHT!r}, JSON.stringify({{...kept, leftAt: Date.now() - 60000}}));
        }})();"""
    )
    page.reload()
    expect(page.locator(".msg")).to_have_count(0)
    assert page.evaluate(f"sessionStorage.getItem({IN_FLIGHT!r})") is None


def test_an_answer_cancelled_while_the_page_was_away_is_not_replayed(
    page: Page, stack: Stack
) -> None:
    """Away for longer than the server's grace (2 s here, under the page's 10 s), the
    answer was cancelled for want of readers: coming back replays nothing stale."""
    send(page, "[long 400] [delay 0.05]")
    expect(answer(page).locator(".answer .text")).to_contain_text("t3")
    job_id = answer(page).get_attribute("data-job-id")
    assert job_id is not None
    page.goto("about:blank")
    db = redis.Redis.from_url(stack.redis_url)

    def final() -> bytes:
        [(_, entry)] = db.xrevrange(keys.events_key(job_id), count=1) or [(b"", {})]
        return entry.get(b"d", b"")

    try:
        wait_until(lambda: CLIENT_GONE.encode() in final(), 15, "the answer cancelled")
    finally:
        db.close()
    page.go_back()
    expect(page.locator("#prompt")).to_be_visible()
    expect(page.locator(".msg")).to_have_count(0)
    assert page.evaluate(f"sessionStorage.getItem({IN_FLIGHT!r})") is None


def test_a_connection_lost_before_the_first_event_follows_its_own_answer(
    page: Page, stack: Stack
) -> None:
    """The first GET /chat reaches the server, which starts the job, but its answer is lost
    before the ``queued`` event: the browser's reconnect sends the prompt again, gets 409 for
    the chat's own job, and the page must read that job rather than report it as another."""
    started: list[str] = []

    def lose_the_first_answer(route: Route) -> None:
        if started or route.request.method != "GET":
            route.continue_()
            return
        with httpx.stream("GET", route.request.url) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    started.append(json.loads(line[5:])["job_id"])
                    break
        # The stream ends before any event, and the browser reconnects 50 ms later.
        route.fulfill(status=200, content_type="text/event-stream", body="retry: 50\n\n")

    before = stack.llm_stats()["requests"]
    read: list[str] = []
    page.on("request", lambda r: read.append(r.url) if r.url.endswith("/events") else None)
    sent: list[str] = []
    page.on("request", lambda r: sent.append(r.method) if "/chat?" in r.url else None)
    page.route(re.compile(r"/chat\?"), lose_the_first_answer)
    send(page, "[long 30] [delay 0.02]")
    last = wait_state(page, "done")
    assert last.get_attribute("data-job-id") == started[0]
    assert raw(last) == "".join(f"t{i} " for i in range(30))
    assert stack.llm_stats()["requests"] == before + 1, "one job, its own"
    assert read == [f"{stack.gateway.url}/chat/{started[0]}/events"]
    assert sorted(sent) == ["GET", "GET", "HEAD"], "the 409's job read from HEAD's header"
    expect(page.locator("#status")).to_have_text("")


def test_stop_from_the_keyboard_leaves_focus_in_the_message_box(page: Page) -> None:
    send(page, "[long 200] [delay 0.05]")
    expect(answer(page).locator(".answer .text")).to_contain_text("3")
    page.keyboard.press("Tab")  # Send is disabled while answering: Stop is next
    expect(page.locator("#stop")).to_be_focused()
    page.keyboard.press("Enter")
    wait_state(page, "stopped", timeout=5_000)
    expect(page.locator("#prompt")).to_be_focused()


@pytest.mark.slow
def test_a_2000_token_answer_at_100_a_second_keeps_the_page_responsive(page: Page) -> None:
    """The worst case for the renderer: one paragraph with no blank line, so each frame
    parses the whole text again. Frames are timed with requestAnimationFrame and long tasks
    observed; the figures go to docs/benchmarks.md."""
    page.evaluate("""() => {
        window.__frames = []; window.__long = [];
        new PerformanceObserver((list) => {
            for (const entry of list.getEntries()) window.__long.push(entry.duration);
        }).observe({ type: "longtask", buffered: false });
        const tick = (now) => { window.__frames.push(now); requestAnimationFrame(tick); };
        requestAnimationFrame(tick);
    }""")
    send(page, "[long 2000] [delay 0.01]")
    last = wait_state(page, "done", timeout=60_000)
    assert raw(last) == "".join(f"t{i} " for i in range(2000))
    frames: list[float] = page.evaluate("window.__frames")
    long_tasks: list[float] = page.evaluate("window.__long")
    gaps = sorted(b - a for a, b in itertools.pairwise(frames))
    p99, worst = gaps[int(len(gaps) * 0.99)], gaps[-1]
    print(
        f"\nrender: {len(frames)} frames, gap p99 {p99:.0f} ms, max {worst:.0f} ms;"
        f" {len(long_tasks)} long tasks, max {max(long_tasks, default=0):.0f} ms"
    )
    assert worst < 250, "a frame took a quarter of a second: the page stalled"
