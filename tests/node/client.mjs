// Calls `tuneloop serve` with the official openai npm package and prints what came back as one JSON line.
// Usage: node client.mjs BASE_URL BASE_MODEL ADAPTER_MODEL CONTRACT_MODEL
import OpenAI from "openai";

const [baseURL, base, adapter, contract] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0 });
const hello = [{ role: "user", content: "Say hello." }];
const out = {};

out.models = (await client.models.list()).data.map((m) => [m.id, m.parent ?? null]);

const full = await client.chat.completions.create({ model: adapter, messages: hello, max_tokens: 8, temperature: 0 });
out.completion = full.choices[0].message.content;

let streamed = "";
let usage = null;
const stream = await client.chat.completions.create({
  model: adapter, messages: hello, max_tokens: 8, temperature: 0, stream: true, stream_options: { include_usage: true },
});
for await (const chunk of stream) {
  if (chunk.choices.length) streamed += chunk.choices[0].delta.content ?? "";
  if (chunk.usage) usage = chunk.usage;
}
out.streamed = streamed;
out.stream_usage = usage;
out.usage = full.usage;

const text = await client.completions.create({ model: base, prompt: "Once upon a time", max_tokens: 4, temperature: 0 });
out.text_completion = [text.object, text.choices[0].finish_reason, text.usage.completion_tokens];

const user = [{ role: "user", content: "My invoice is wrong." }];
const implicit = await client.chat.completions.create({ model: contract, messages: user, max_tokens: 1 });
out.contract_prompt_tokens = implicit.usage.prompt_tokens;

const schema = {
  type: "object", properties: { label: { enum: ["a", "b"] } }, required: ["label"], additionalProperties: false,
};
const constrained = await client.chat.completions.create({
  model: base, messages: user, max_tokens: 40, temperature: 0,
  response_format: { type: "json_schema", json_schema: { name: "label", schema, strict: true } },
});
out.json_schema = [constrained.choices[0].finish_reason, constrained.choices[0].message.content];

const together = await Promise.all(
  [base, adapter, contract, base, adapter].map((model) =>
    client.chat.completions.create({ model, messages: hello, max_tokens: 6, temperature: 0 })),
);
out.mixed = together.map((r) => r.choices[0].message.content);

try {
  await client.chat.completions.create({ model: base, messages: hello, max_tokens: 2, logprobs: true });
  out.unsupported = null;
} catch (err) {
  out.unsupported = [err.status, err.param];
}

console.log(JSON.stringify(out));
