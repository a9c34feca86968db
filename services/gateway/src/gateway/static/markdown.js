// Markdown as it streams: marked parses, DOMPurify sanitizes, nothing a model writes runs.
//
// Decisions a reader might want to undo:
// - Raw HTML in an answer goes through DOMPurify (no scripts, no event handlers, no
//   styles, no forms), and the page's Content-Security-Policy allows no inline script at
//   all: a payload that slipped through would still not run.
// - Links open in a new tab with rel="noopener noreferrer"; code blocks get a Copy button.
// - Re-parsing the whole answer on every token costs O(n²) over a long answer. Text up to
//   the last blank line outside a code fence is rendered once and kept; only the tail
//   after it is parsed again, at most once per frame. When the answer ends, the whole is
//   rendered once more, so constructs that span blank lines (loose lists, reference
//   links) come out exactly as marked renders the complete text.
"use strict";

(() => {
  const { marked, DOMPurify } = window;
  const PURIFY = {
    USE_PROFILE: { html: true },
    FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "option"],
    FORBID_ATTR: ["style"],
    RETURN_DOM_FRAGMENT: true,
  };
  const FENCE = /^ {0,3}(```|~~~)/;

  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A" && node.hasAttribute("href")) {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
  });

  function fragment(markdown) {
    const html = marked.parse(markdown, { async: false, gfm: true });
    const out = DOMPurify.sanitize(html, PURIFY);
    for (const pre of out.querySelectorAll("pre")) addCopyButton(pre);
    return out;
  }

  function addCopyButton(pre) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy-code";
    button.textContent = "Copy";
    button.setAttribute("aria-label", "Copy the code");
    button.addEventListener("click", async () => {
      const code = pre.querySelector("code") || pre;
      try {
        await navigator.clipboard.writeText(code.textContent);
        button.textContent = "Copied";
      } catch {
        button.textContent = "Copy failed";
      }
      setTimeout(() => (button.textContent = "Copy"), 1500);
    });
    pre.prepend(button);
  }

  // Where the text can be cut without changing how the part before it renders: after the
  // last blank line that is outside a code fence (0 if none).
  function stableEnd(raw) {
    let fenced = false;
    let end = 0;
    let start = 0;
    while (start < raw.length) {
      const newline = raw.indexOf("\n", start);
      if (newline === -1) break; // the last line is not finished
      const line = raw.slice(start, newline);
      if (FENCE.test(line)) fenced = !fenced;
      else if (!fenced && line.trim() === "") end = newline + 1;
      start = newline + 1;
    }
    return end;
  }

  // One stretch of an answer's text (tool chips split an answer into several).
  class MarkdownBlock {
    constructor(container) {
      this.el = container;
      this.raw = "";
      this.kept = document.createElement("div");
      this.tail = document.createElement("div");
      this.keptUpTo = 0;
      this.scheduled = false;
      this.finished = false;
      container.append(this.kept, this.tail);
    }

    append(text) {
      this.raw += text;
      if (!this.scheduled && !this.finished) {
        this.scheduled = true;
        requestAnimationFrame(() => this.render());
      }
    }

    render() {
      this.scheduled = false;
      if (this.finished) return;
      const end = stableEnd(this.raw);
      if (end > this.keptUpTo) {
        this.kept.append(fragment(this.raw.slice(this.keptUpTo, end)));
        this.keptUpTo = end;
      }
      this.tail.replaceChildren(fragment(this.raw.slice(this.keptUpTo)));
    }

    finish() {
      if (this.finished) return;
      this.finished = true;
      this.el.replaceChildren(fragment(this.raw));
    }
  }

  window.streamgateMarkdown = { MarkdownBlock, stableEnd };
})();
