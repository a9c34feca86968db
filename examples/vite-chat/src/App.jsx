import { useChat } from "@ai-sdk/react";
import { DefaultChatTransport } from "ai";
import { useState } from "react";

// One chat per browser tab's storage: a reload resumes its answer (resume: true asks
// GET /aisdk/chat/<id>/stream on mount, answered from Redis by any gateway).
function chatId() {
  let id = sessionStorage.getItem("streamgate.chat");
  if (!id) {
    id = crypto.randomUUID();
    sessionStorage.setItem("streamgate.chat", id);
  }
  return id;
}

const API = "/aisdk/chat";
const transport = new DefaultChatTransport({
  api: API,
  // With API_KEYS on the gateway: headers: { Authorization: `Bearer ${key}` },
  // A Streamgate role (GET /roles): body: { role: "teacher" },
});

export function App() {
  const [id] = useState(chatId);
  const [input, setInput] = useState("");
  const { messages, sendMessage, status, stop, error } = useChat({ id, transport, resume: true });
  const busy = status === "submitted" || status === "streaming";

  async function stopNow() {
    stop(); // closes the stream; the gateway would cancel after its grace
    // At once, and exactly this answer: its message id is its Streamgate job id.
    const answer = messages.findLast((message) => message.role === "assistant");
    if (answer) await fetch(`/chat/${answer.id}`, { method: "DELETE" });
  }

  function submit(event) {
    event.preventDefault();
    if (!input.trim() || busy) return;
    sendMessage({ text: input });
    setInput("");
  }

  return (
    <main>
      <h1>Streamgate + useChat</h1>
      <ol className="log">
        {messages.map((message) => (
          <li key={message.id} className={message.role}>
            {message.parts.map((part, index) => (
              <Part key={index} part={part} />
            ))}
          </li>
        ))}
      </ol>
      {error && <p className="error">Error: {error.message}</p>}
      <form onSubmit={submit}>
        <input
          value={input}
          onChange={(event) => setInput(event.target.value)}
          placeholder="Ask anything (try: calculate 2 + 3 * 4)"
          aria-label="Message"
        />
        {busy ? (
          <button type="button" onClick={stopNow}>
            Stop
          </button>
        ) : (
          <button type="submit">Send</button>
        )}
      </form>
    </main>
  );
}

// Streamgate's own tools ran in its worker: they arrive as dynamic tool parts.
function Part({ part }) {
  if (part.type === "text") return <p className="text">{part.text}</p>;
  if (part.type === "dynamic-tool") {
    const done = part.state === "output-available";
    return (
      <details className="tool">
        <summary>
          {part.toolName} {done ? `→ ${String(part.output)}` : "…"}
        </summary>
        <pre>{JSON.stringify(part.input, null, 2)}</pre>
      </details>
    );
  }
  return null;
}
