// Streamgate web chat: streams an answer over the browser's own EventSource.
//
// Decisions a reader might want to undo:
// - EventSource, not fetch streaming: the browser reconnects by itself with Last-Event-ID
//   and the server resumes the same job, so a dropped connection costs nothing.
// - EventSource cannot show a failed response's status or send headers. The API key goes
//   in the query (access_token=), and when a stream fails before its final event a HEAD
//   request to the same URL (which never enqueues a job) tells us why.
// - Answers are Markdown (markdown.js): rendered as they stream, sanitized, no script runs.
// - A reload picks up the answer in flight (its job id is kept in sessionStorage, per tab)
//   and replays it from its start: the new page has none of it on screen. Only that answer
//   comes back, not the conversation before it; a finished one is not shown again, nor
//   one cancelled while the page was away for longer than the server's grace.
// - handleEvent is exposed as window.streamgate.handleEvent so tests can render events
//   (tool chips, say) that the demo model does not produce.
"use strict";

(() => {
  const STORE = {
    session: "streamgate.session",
    apiKey: "streamgate.apiKey",
    role: "streamgate.role",
    inFlight: "streamgate.inFlight", // sessionStorage: the answer a reload resumes
  };
  const JOB_ID_RE = /^[0-9a-f]{32}$/;
  // Away longer than this (the server's default DISCONNECT_GRACE_S is 10 s), an answer in
  // flight was cancelled for want of readers: a restored tab does not replay it.
  const AWAY_MAX_MS = 10_000;
  const CLIENT_GONE = "cancelled: every reader disconnected"; // the server's words for it
  const SESSION_RE = /^[A-Za-z0-9_-]{1,64}$/;
  const ROLE_RE = /^[A-Za-z0-9_.-]{1,64}$/;
  // The browser would retry forever; give up sooner when nothing ever arrived.
  const GIVE_UP_RECONNECTING_MS = 60_000;
  const GIVE_UP_CONNECTING_MS = 15_000;
  const STOP_FALLBACK_MS = 5_000; // if the cancelled event never comes, stop locally
  const JOB_ID_WAIT_MS = 2_000; // Stop pressed before the job has an id

  const $ = (id) => document.getElementById(id);
  const els = {
    log: $("log"),
    empty: $("empty"),
    status: $("status"),
    composer: $("composer"),
    prompt: $("prompt"),
    send: $("send"),
    stop: $("stop"),
    newChat: $("new-chat"),
    rolePicker: $("role-picker"),
    role: $("role"),
    keyPanel: $("key-panel"),
    keyForm: $("key-form"),
    keyReason: $("key-reason"),
    keyInput: $("api-key"),
    keyCancel: $("key-cancel"),
  };

  // Web storage throws in some private modes: the page still works, it just forgets.
  function storageIn(area) {
    return {
      get(name) {
        try {
          return window[area].getItem(name);
        } catch {
          return null;
        }
      },
      set(name, value) {
        try {
          window[area].setItem(name, value);
        } catch {
          /* not persisted */
        }
      },
      remove(name) {
        try {
          window[area].removeItem(name);
        } catch {
          /* nothing kept */
        }
      },
    };
  }
  const storage = storageIn("localStorage");
  const tabStorage = storageIn("sessionStorage"); // this tab's, and it outlives a reload

  function newSessionId() {
    // crypto.randomUUID needs a secure context; getRandomValues works on plain http too.
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    const b64 = btoa(String.fromCharCode(...bytes));
    return b64.replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  let session = storage.get(STORE.session);
  if (!session || !SESSION_RE.test(session)) {
    session = newSessionId();
    storage.set(STORE.session, session);
  }
  let apiKey = storage.get(STORE.apiKey) || "";
  let turn = null; // the answer in flight, if any
  let lastSource = null; // for tests and debugging
  let afterKeySaved = null; // what to do once a key is entered

  // --- requests -------------------------------------------------------------------

  function authHeaders(key = apiKey) {
    return key ? { Authorization: "Bearer " + key } : {};
  }

  function chatUrl(prompt) {
    const params = new URLSearchParams({ prompt, session });
    if (!els.rolePicker.hidden && els.role.value) params.set("role", els.role.value);
    if (apiKey) params.set("access_token", apiKey);
    return "/chat?" + params.toString();
  }

  function withParam(url, name, value) {
    return url + (url.includes("?") ? "&" : "?") + name + "=" + encodeURIComponent(value);
  }

  // Reading a job never starts one, unlike GET /chat?prompt=, which a reconnect re-sends.
  function eventsUrl(jobId, key) {
    const url = "/chat/" + encodeURIComponent(jobId) + "/events";
    return key ? withParam(url, "access_token", key) : url;
  }

  // Why did the stream fail? HEAD answers the status without starting a job.
  async function probe(t) {
    let url = t.url;
    if (t.lastEventId) url = withParam(url, "last_event_id", t.lastEventId);
    try {
      // With the turn's own key: a key saved since must not answer for the one it was sent with.
      const response = await fetch(url, { method: "HEAD", headers: authHeaders(t.key) });
      t.busyJob = response.headers.get("Streamgate-Job-Id"); // a 409's: the session's job
      return response.status;
    } catch {
      return 0;
    }
  }

  // A 400 or 413 comes from checking the request before any job exists, so asking again
  // with GET starts nothing and brings the server's own words ("unknown role ...").
  async function serverWords(t, status) {
    if (t.gotEvent || (status !== 400 && status !== 413)) return null;
    const controller = new AbortController();
    try {
      const response = await fetch(t.url, { headers: authHeaders(t.key), signal: controller.signal });
      if (response.ok) {
        controller.abort(); // it was accepted after all: drop it, the server cancels it
        return null;
      }
      const body = await response.json();
      return typeof body.error === "string" && body.error ? body.error : null;
    } catch {
      return null;
    }
  }

  function describeFailure(status, t) {
    if (status === 0) return "The server could not be reached. Check your connection and try again.";
    if (status === 400) return "The server refused this message as invalid.";
    if (status === 404) return "This answer is no longer on the server (it expired or was lost).";
    if (status === 409) return "Another answer is still running in this chat. Wait for it, or start a new chat.";
    if (status === 413 || status === 414 || status === 431) return "This message is too long for the server.";
    if (status === 429) return "Too many messages for now. Wait a moment and try again.";
    if (status === 503) return "The service is busy or unavailable. Try again shortly.";
    if (status >= 500) return `The server failed (HTTP ${status}). Try again shortly.`;
    if (t.gotEvent) return "The connection was lost and the answer could not be resumed.";
    // HEAD passed, so the refusal came when queueing: a rate limit, a full queue, or this
    // chat still answering elsewhere (another tab, or before a reload).
    return "The server would not start this answer: it may be busy, or this chat may still be answering in another tab. Wait a moment and try again.";
  }

  // --- rendering ------------------------------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function nearBottom() {
    const log = els.log;
    return log.scrollHeight - log.scrollTop - log.clientHeight < 48;
  }

  // Keep following the answer unless the user scrolled up to read.
  function appendKeepingScroll(mutate) {
    const follow = nearBottom();
    mutate();
    if (follow) els.log.scrollTop = els.log.scrollHeight;
  }

  function setStatus(text) {
    els.status.textContent = text;
  }

  function setStreaming(on) {
    els.send.disabled = on;
    els.stop.hidden = !on;
    els.stop.disabled = !on;
    els.log.setAttribute("aria-busy", on ? "true" : "false");
  }

  function startTurn(prompt) {
    els.empty.hidden = true;
    const t = {
      prompt,
      key: apiKey, // the key this turn was sent with
      userEl: null,
      el: el("article", "msg assistant"),
      body: el("div", "answer"),
      notice: null,
      text: null, // the MarkdownBlock tokens are appended to (markdown.js)
      raw: "", // every token of the answer, as sent
      chips: new Map(),
      source: null,
      url: "",
      jobId: null,
      lastEventId: "",
      gotEvent: false,
      opened: false, // the stream's answer began: only then does a job of this turn exist
      busyJob: null, // the job a 409 names (its Streamgate-Job-Id header)
      final: false,
      stopRequested: false,
      cancelSent: false,
      reconnecting: false,
      resumed: false, // picked up again after a reload
      giveUpTimer: null,
    };
    t.el.dataset.state = "streaming";
    t.el.setAttribute("aria-label", "Answer");
    t.body.append(el("span", "typing", "…"));
    t.el.append(t.body);
    appendKeepingScroll(() => {
      if (prompt !== null) {
        t.userEl = el("article", "msg user");
        t.userEl.setAttribute("aria-label", "You");
        t.userEl.append(el("div", "said", prompt));
        els.log.append(t.userEl);
      }
      els.log.append(t.el);
    });
    turn = t;
    return t;
  }

  // Take a turn off the screen as if it had never been sent.
  function withdraw(t) {
    finish(t, "error", "withdrawn");
    t.el.remove();
    if (t.userEl) t.userEl.remove();
    if (!els.log.querySelector(".msg")) els.empty.hidden = false;
  }

  function dropTyping(t) {
    const typing = t.body.querySelector(".typing");
    if (typing) typing.remove();
  }

  function appendToken(t, token) {
    appendKeepingScroll(() => {
      dropTyping(t);
      if (!t.text) {
        const block = el("div", "text markdown");
        t.text = new window.streamgateMarkdown.MarkdownBlock(block, appendKeepingScroll);
        t.body.append(block);
      }
      t.raw += token;
      t.el.streamgateRaw = t.raw; // what was sent, for tests and debugging
      t.text.append(token);
    });
  }

  function chipFor(t, id, name) {
    let chip = t.chips.get(id);
    if (!chip) {
      const node = el("details", "tool-chip pending");
      node.dataset.callId = id;
      const summary = el("summary", "tool-summary");
      const detail = el("div", "tool-detail");
      node.append(summary, detail);
      // Nothing to unfold until the output is in.
      summary.addEventListener("click", (event) => {
        if (node.classList.contains("pending")) event.preventDefault();
      });
      chip = { el: node, summary, detail, name };
      t.chips.set(id, chip);
      appendKeepingScroll(() => {
        dropTyping(t);
        t.body.append(node);
      });
      if (t.text) t.text.finish();
      t.text = null; // later tokens start after the chip
    }
    return chip;
  }

  function showToolCall(t, call) {
    const name = String(call.name ?? "a tool");
    const chip = chipFor(t, String(call.id ?? ""), name);
    chip.summary.textContent = `calling ${name}…`;
  }

  function shorten(text, max) {
    return text.length > max ? text.slice(0, max - 1) + "…" : text;
  }

  function showToolsCalled(t, calls) {
    for (const call of calls) {
      if (!call || typeof call !== "object") continue;
      const name = String(call.name ?? "a tool");
      const chip = chipFor(t, String(call.id ?? ""), name);
      const output = typeof call.output === "string" ? call.output : JSON.stringify(call.output ?? "");
      const args =
        typeof call.arguments === "string" ? call.arguments : JSON.stringify(call.arguments ?? {}, null, 1);
      chip.el.classList.remove("pending");
      chip.el.classList.add("called");
      chip.summary.textContent = `${name} → ${shorten(output.replace(/\s+/g, " ").trim(), 60)}`;
      chip.detail.replaceChildren(
        el("div", "tool-label", "arguments"),
        el("pre", "tool-args", args),
        el("div", "tool-label", "output"),
        el("pre", "tool-output", output),
      );
    }
  }

  function showNotice(t, className, text) {
    dropTyping(t);
    if (t.notice) t.notice.remove();
    t.notice = el("p", "notice " + className, text);
    appendKeepingScroll(() => t.el.append(t.notice));
  }

  // --- the stream -----------------------------------------------------------------

  function finish(t, kind, message) {
    if (t.final) return;
    t.final = true;
    forget(t);
    if (t.source) t.source.close();
    clearTimeout(t.giveUpTimer);
    t.el.classList.remove("reconnecting");
    dropTyping(t);
    if (t.text) t.text.finish();
    if (kind === "done") {
      t.el.dataset.state = "done";
      if (!t.raw && t.chips.size === 0) showNotice(t, "muted", "(The model sent an empty answer.)");
      setStatus("");
    } else if (message === "cancelled") {
      t.el.dataset.state = "stopped";
      showNotice(t, "stopped", "Stopped.");
      setStatus("stopped");
    } else {
      t.el.dataset.state = "error";
      showNotice(t, "error", "Error: " + message);
      setStatus("The answer failed.");
    }
    if (turn === t) {
      turn = null;
      // Stop is about to vanish: keep keyboard focus somewhere useful.
      if (document.activeElement === els.stop) els.prompt.focus();
      setStreaming(false);
    }
  }

  function handleEvent(data, t = turn || startTurn(null)) {
    if (t.final || !data || typeof data !== "object") return;
    t.gotEvent = true;
    if (typeof data.token === "string") {
      appendToken(t, data.token);
    } else if (data.tool_call && typeof data.tool_call === "object") {
      showToolCall(t, data.tool_call);
    } else if (Array.isArray(data.tools_called)) {
      showToolsCalled(t, data.tools_called);
    } else if (typeof data.error === "string" && t.resumed && data.error === CLIENT_GONE) {
      // Replayed after a reload, it was cancelled while the page was away longer than the
      // server's grace: nothing stale to show.
      withdraw(t);
      setStatus("");
    } else if (typeof data.error === "string") {
      finish(t, "error", data.error);
    } else if (data.lifecycle === "done") {
      finish(t, "done");
    } else if (data.lifecycle === "queued" || data.lifecycle === "started") {
      if (typeof data.job_id === "string" && data.job_id !== t.jobId) {
        t.jobId = data.job_id;
        remember(t);
      }
      t.el.dataset.jobId = t.jobId || "";
      if (t.stopRequested) {
        if (!t.cancelSent) cancel(t);
      } else if (data.lifecycle === "queued") {
        const ahead = Number(data.position) > 1 ? ` (position ${data.position})` : "";
        setStatus("queued" + ahead);
      } else {
        setStatus("answering…");
      }
    }
    // Unknown keys and lifecycle values are ignored, as the protocol asks.
  }

  // --- the answer in flight, across a reload -----------------------------------------

  function remember(t) {
    const answer = { jobId: t.jobId, prompt: t.prompt, session, leftAt: null };
    tabStorage.set(STORE.inFlight, JSON.stringify(answer));
  }

  // When the page goes away: a tab restored long after finds its answer cancelled (its
  // readers left for longer than the server's grace) or expired, and does not replay it.
  function noteLeaving() {
    const answer = kept();
    if (answer) tabStorage.set(STORE.inFlight, JSON.stringify({ ...answer, leftAt: Date.now() }));
  }

  function kept() {
    try {
      return JSON.parse(tabStorage.get(STORE.inFlight) || "null");
    } catch {
      return null;
    }
  }

  function forget(t) {
    const answer = kept();
    if (answer && answer.jobId === t.jobId) tabStorage.remove(STORE.inFlight);
  }

  // The page was reloaded (or its tab restored) while an answer ran: show it again, from its
  // start, and follow it to its end. Another chat begun since in another tab leaves it be.
  function resumeAfterReload() {
    const answer = kept();
    if (!answer) return;
    const away = typeof answer.leftAt === "number" ? Date.now() - answer.leftAt : 0;
    const ours = answer.session === session && JOB_ID_RE.test(String(answer.jobId));
    if (!ours || away > AWAY_MAX_MS) {
      tabStorage.remove(STORE.inFlight);
      return;
    }
    const t = startTurn(typeof answer.prompt === "string" ? answer.prompt : null);
    t.jobId = answer.jobId;
    t.resumed = true;
    t.url = eventsUrl(t.jobId, t.key);
    setStreaming(true);
    setStatus("resuming…");
    open(t);
  }

  function reconnecting(t) {
    if (!t.reconnecting) {
      t.reconnecting = true;
      t.el.classList.add("reconnecting");
      const [wait, message] = t.gotEvent
        ? [GIVE_UP_RECONNECTING_MS, "The connection was lost and did not come back."]
        : [GIVE_UP_CONNECTING_MS, describeFailure(0, t)];
      t.giveUpTimer = setTimeout(() => finish(t, "error", message), wait);
    }
    setStatus("reconnecting…");
  }

  function reconnected(t) {
    if (!t.reconnecting) return;
    t.reconnecting = false;
    t.el.classList.remove("reconnecting");
    clearTimeout(t.giveUpTimer);
    setStatus(t.stopRequested ? "stopping…" : "answering…");
  }

  async function failed(t) {
    t.source.close();
    const status = await probe(t);
    if (t.final) return;
    if (status === 404 && t.resumed && !t.gotEvent) {
      withdraw(t); // it ended long enough ago to have expired: nothing to show
      setStatus("");
      return;
    }
    if (status === 401 && (t.gotEvent || t.resumed)) {
      finish(t, "error", "The server stopped accepting the API key mid-answer.");
      askForKey(refusedKey(), null);
      return;
    }
    if (status === 401) {
      // Nothing was answered: take the message back, ask for a key, then send it again.
      withdraw(t);
      els.prompt.value = t.prompt || "";
      if (t.key !== apiKey) {
        send(els.prompt.value); // refused an older key: the one saved since may do
        return;
      }
      setStatus("An API key is needed.");
      askForKey(refusedKey(), () => send(els.prompt.value));
      return;
    }
    if (status === 204) {
      finish(t, "error", "The answer ended, but its last part did not arrive.");
      return;
    }
    const words = await serverWords(t, status);
    if (t.final) return;
    if (status === 409 && t.opened && typeof t.busyJob === "string" && JOB_ID_RE.test(t.busyJob)) {
      // Only after the stream had opened (the server answers 200 once the job exists) and
      // was lost before its first event: the browser sent the prompt again and met this
      // turn's own job. Without that open, a 409 may name another tab's job: not followed.
      t.url = eventsUrl(t.busyJob, t.key);
      open(t);
      return;
    }
    finish(t, "error", words || describeFailure(status, t));
  }

  function open(t) {
    const source = new EventSource(t.url);
    t.source = source;
    lastSource = source;
    source.onopen = () => {
      t.opened = true;
      reconnected(t);
    };
    source.onmessage = (message) => {
      if (t.final) return;
      if (message.lastEventId) t.lastEventId = message.lastEventId;
      reconnected(t);
      let data;
      try {
        data = JSON.parse(message.data);
      } catch {
        return; // not ours to understand
      }
      handleEvent(data, t);
    };
    source.onerror = () => {
      if (t.final) return;
      // CONNECTING: the browser retries with Last-Event-ID by itself. CLOSED: it gave up.
      if (source.readyState === EventSource.CONNECTING) reconnecting(t);
      else failed(t);
    };
  }

  function send(text) {
    const prompt = (text || "").trim() ? text : "";
    if (!prompt || turn) return;
    els.prompt.value = "";
    autosize();
    const t = startTurn(prompt);
    t.url = chatUrl(prompt);
    setStreaming(true);
    setStatus("sending…");
    open(t);
  }

  async function cancel(t) {
    t.cancelSent = true;
    setTimeout(() => finish(t, "error", "cancelled"), STOP_FALLBACK_MS);
    try {
      const response = await fetch("/chat/" + encodeURIComponent(t.jobId), {
        method: "DELETE",
        headers: authHeaders(t.key), // the job is its key's: a key saved since may not stop it
      });
      // The stream ends with {"error": "cancelled"}; if the server would not cancel, stop here.
      if (!response.ok) finish(t, "error", "cancelled");
    } catch {
      finish(t, "error", "cancelled");
    }
  }

  function stop() {
    const t = turn;
    if (!t || t.stopRequested) return;
    t.stopRequested = true;
    // Chromium moves focus from a button it disables to <body>: hand it over first.
    if (document.activeElement === els.stop) els.prompt.focus();
    els.stop.disabled = true;
    setStatus("stopping…");
    if (t.jobId) {
      cancel(t);
      return;
    }
    // The queued event names the job any moment now and cancels it (see handleEvent). If it
    // never comes (the server is unreachable), stop here: a GET job without a reader is
    // cancelled by the server after its grace period.
    setTimeout(() => {
      if (!t.cancelSent) finish(t, "error", "cancelled");
    }, JOB_ID_WAIT_MS);
  }

  function newChat() {
    if (turn) {
      const t = turn;
      if (t.jobId) cancel(t);
      finish(t, "error", "cancelled");
    }
    session = newSessionId();
    storage.set(STORE.session, session);
    for (const node of els.log.querySelectorAll(".msg")) node.remove();
    els.empty.hidden = false;
    setStatus("New chat started.");
    els.prompt.focus();
  }

  // --- API key --------------------------------------------------------------------

  function refusedKey() {
    return apiKey ? "The server refused the saved API key. Enter a valid one." : null;
  }

  function askForKey(reason, then) {
    els.keyReason.textContent =
      reason || "This server asks for an API key. It is kept in this browser only.";
    if (then || els.keyPanel.hidden) afterKeySaved = then || null;
    if (els.keyPanel.hidden) {
      // Opened once: a second refusal must not wipe what the user is typing.
      els.keyPanel.hidden = false;
      els.keyInput.value = "";
      els.keyInput.focus();
    }
  }

  function saveKey(event) {
    event.preventDefault();
    const value = els.keyInput.value.trim();
    if (!value) return;
    apiKey = value;
    storage.set(STORE.apiKey, apiKey);
    els.keyPanel.hidden = true;
    setStatus("API key saved.");
    const then = afterKeySaved;
    afterKeySaved = null;
    loadRoles();
    if (then) then();
    els.prompt.focus();
  }

  // --- roles ----------------------------------------------------------------------

  async function loadRoles() {
    let roles;
    const key = apiKey;
    try {
      const response = await fetch("/roles", { headers: authHeaders() });
      if (response.status === 401 && els.keyPanel.hidden && key === apiKey) {
        askForKey(refusedKey(), null);
      }
      if (!response.ok) throw new Error(String(response.status));
      roles = await response.json();
    } catch {
      els.rolePicker.hidden = true; // no roles on this server (yet): the default applies
      return;
    }
    const usable = Array.isArray(roles)
      ? roles.filter((r) => r && typeof r.name === "string" && ROLE_RE.test(r.name))
      : [];
    if (usable.length === 0) {
      els.rolePicker.hidden = true;
      return;
    }
    // The server lists its default role first, so a fresh page starts on it.
    const options = [];
    for (const role of usable) {
      const option = el("option", "", role.name);
      option.value = role.name;
      if (typeof role.description === "string") option.title = role.description;
      options.push(option);
    }
    els.role.replaceChildren(...options);
    const saved = storage.get(STORE.role);
    if (saved !== null && usable.some((r) => r.name === saved)) els.role.value = saved;
    describeRole();
    els.rolePicker.hidden = false;
  }

  // The closed <select> shows only the name; its tooltip tells what the role does.
  function describeRole() {
    const chosen = els.role.selectedOptions[0];
    els.role.title = chosen ? chosen.title : "";
  }

  // --- composer -------------------------------------------------------------------

  function autosize() {
    els.prompt.style.height = "auto";
    els.prompt.style.height = Math.min(els.prompt.scrollHeight, 200) + "px";
  }

  els.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send(els.prompt.value);
  });
  els.prompt.addEventListener("keydown", (event) => {
    // Enter sends; Shift+Enter is a newline; never send mid-composition (IME input).
    if (event.key !== "Enter" || event.shiftKey || event.isComposing || event.keyCode === 229) return;
    event.preventDefault();
    if (!turn) send(els.prompt.value);
  });
  els.prompt.addEventListener("input", autosize);
  els.stop.addEventListener("click", stop);
  els.newChat.addEventListener("click", newChat);
  els.role.addEventListener("change", () => {
    storage.set(STORE.role, els.role.value);
    describeRole();
  });
  els.keyForm.addEventListener("submit", saveKey);
  els.keyCancel.addEventListener("click", () => {
    els.keyPanel.hidden = true;
    afterKeySaved = null;
  });

  window.streamgate = {
    handleEvent: (data) => handleEvent(data),
    send,
    stop,
    newChat,
    get session() {
      return session;
    },
    get jobId() {
      return turn ? turn.jobId : null;
    },
    get lastSource() {
      return lastSource;
    },
    get streaming() {
      return turn !== null;
    },
  };

  setStreaming(false);
  loadRoles();
  window.addEventListener("pagehide", noteLeaving);
  resumeAfterReload();
})();
