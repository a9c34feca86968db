// The AI SDK's own DefaultChatTransport (what useChat uses) against two gateways: an answer
// with a tool call, an answer dropped mid-stream and resumed on the other gateway, and a
// resume after the end (204). Prints what it received as JSON for the Python test.
import { DefaultChatTransport } from "ai";

const [first, second] = process.argv.slice(2);
const transport = (base) => new DefaultChatTransport({ api: `${base}/aisdk/chat` });
const user = (id, text) => ({ id, role: "user", parts: [{ type: "text", text }] });

async function drain(stream, stopAfterDeltas = Infinity) {
  const chunks = [];
  const reader = stream.getReader();
  let deltas = 0;
  while (true) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    if (value.type === "text-delta" && ++deltas >= stopAfterDeltas) {
      await reader.cancel();
      break;
    }
  }
  return chunks;
}

const text = (chunks) =>
  chunks.filter((c) => c.type === "text-delta").map((c) => c.delta).join("");

const send = (base, chatId, prompt, abortSignal) =>
  transport(base).sendMessages({
    chatId,
    messages: [user("m1", prompt)],
    trigger: "submit-message",
    messageId: undefined,
    abortSignal,
  });

// 1. A tool call and its answer.
const tool = await drain(await send(first, "chat-tool", "calculate 2 + 3 * 4"));

// 2. Dropped after 20 deltas on the first gateway (the client aborts, as stop() does),
// resumed on the second: the resumed stream replays the whole answer.
const abort = new AbortController();
const head = await drain(await send(first, "chat-long", "[long 200] [delay 0.01]", abort.signal), 20);
abort.abort();
const resumed = await transport(second).reconnectToStream({ chatId: "chat-long" });
const rest = resumed === null ? null : await drain(resumed);

// 3. Nothing left to resume once it ended.
const after = await transport(second).reconnectToStream({ chatId: "chat-long" });

console.log(
  JSON.stringify({
    tool,
    toolText: text(tool),
    headText: text(head),
    resumed: rest,
    resumedText: rest === null ? null : text(rest),
    afterEnd: after === null ? "none" : "stream",
  }),
);
