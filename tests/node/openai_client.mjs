// The official openai package against a gateway: one streamed chat completion and one
// background response, streamed; prints what it received as JSON for the Python test.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.argv[2], apiKey: "unused", maxRetries: 0 });

const chat = await client.chat.completions.create({
  model: "assistant",
  messages: [{ role: "user", content: "[hard]" }],
  stream: true,
  stream_options: { include_usage: true },
});
let text = "";
let usage = null;
for await (const chunk of chat) {
  if (chunk.choices.length) text += chunk.choices[0].delta.content ?? "";
  else usage = chunk.usage;
}

const background = await client.responses.create({
  model: "assistant",
  input: "[long 30]",
  background: true,
  stream: true,
});
const types = [];
let deltas = "";
let id = null;
for await (const event of background) {
  types.push(event.type);
  id ??= event.response?.id;
  if (event.type === "response.output_text.delta") deltas += event.delta;
}
const retrieved = await client.responses.retrieve(id);
console.log(JSON.stringify({ text, usage, types, deltas, status: retrieved.status, output: retrieved.output_text }));
