// Markdown as it streams: marked parses, DOMPurify sanitizes, nothing a model writes runs.
//
// Decisions a reader might want to undo:
// - Raw HTML in an answer is shown as text, not rendered: prose that mentions a tag
//   ("wrap it in a <div>") keeps its words, and no markup of the model's reaches the page.
//   DOMPurify still cleans marked's output (no scripts, handlers, styles or forms), and the
//   page's Content-Security-Policy allows no inline script and no images but data: URLs.
// - A single newline is a line break (marked's `breaks`), as chat models mean it.
// - Links open in a new tab with rel="noopener noreferrer"; code blocks get a Copy button.
// - Re-parsing the whole answer on every token costs O(n²) over a long answer. Text up to
//   the last blank line outside a code fence (and before a line that is not indented) is
//   rendered once and kept; only the tail after it is parsed again, at most once per
//   frame. When the answer ends, the whole is rendered once more, so constructs that span
//   blank lines (loose lists, reference links) come out exactly as marked renders them.
"use strict";

(() => {
  const { marked, DOMPurify } = window;
  const PURIFY = {
    USE_PROFILE: { html: true },
    FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "option"],
    FORBID_ATTR: ["style", "hidden", "class"],
    RETURN_DOM_FRAGMENT: true,
  };
  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const escape = (text) => text.replace(/[&<>"']/g, (c) => ESCAPES[c]);
  // An opening fence: 3+ backticks (no backtick after) or 3+ tildes, indented 0-3 spaces.
  const OPEN = /^ {0,3}(`{3,}(?!.*`)|~{3,})/;

  marked.use({ gfm: true, breaks: true, renderer: { html: ({ text }) => escape(text) } });

  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A" && node.hasAttribute("href")) {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
  });

  function fragment(markdown) {
    const html = marked.parse(markdown, { async: false });
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

  // Where the text can be cut without changing how the part before it renders: after a
  // blank line outside a code fence, before a complete line that is not indented (an
  // indented one may continue a list item or an indented code block); 0 if nowhere.
  function stableEnd(raw) {
    let fence = null; // the open fence's marker ("```", "~~~~", ...)
    let end = 0;
    let afterBlank = -1; // where the line after an unfenced blank line starts
    let start = 0;
    while (start < raw.length) {
      const newline = raw.indexOf("\n", start);
      if (newline === -1) break; // the last line is not finished
      const line = raw.slice(start, newline);
      if (afterBlank === start && !/^[ \t]/.test(line)) end = start;
      if (fence !== null) {
        const close = line.trim();
        if (close[0] === fence[0] && /^(`+|~+)$/.test(close) && close.length >= fence.length) {
          fence = null;
        }
      } else {
        const open = OPEN.exec(line);
        if (open) fence = open[1];
        else if (line.trim() === "") afterBlank = newline + 1;
      }
      start = newline + 1;
    }
    return end;
  }

  // One stretch of an answer's text (tool chips split an answer into several). `wrap`
  // applies each change to the page (the page's keeps the log following the answer).
  class MarkdownBlock {
    constructor(container, wrap = (change) => change()) {
      this.el = container;
      this.wrap = wrap;
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
      this.wrap(() => {
        if (end > this.keptUpTo) {
          this.kept.append(fragment(this.raw.slice(this.keptUpTo, end)));
          this.keptUpTo = end;
        }
        this.tail.replaceChildren(fragment(this.raw.slice(this.keptUpTo)));
      });
    }

    finish() {
      if (this.finished) return;
      this.finished = true;
      this.wrap(() => this.el.replaceChildren(fragment(this.raw)));
    }
  }

  window.streamgateMarkdown = { MarkdownBlock, stableEnd };
})();
