// Text sources for an utterance. Each is an async iterable of text deltas, so the client
// treats typed text, a simulated LLM and a real chat completion the same way.

// Split text the way an LLM tokenizer roughly would: words keep their leading space, and long
// words break into ~4-character pieces, so the server sees realistic, uneven deltas.
export function splitLikeLlm(text) {
  const tokens = [];
  for (const word of text.match(/\s*\S+|\s+/g) || []) {
    const lead = word.match(/^\s*/)[0];
    const body = word.slice(lead.length);
    if (body.length <= 5) {
      tokens.push(word);
      continue;
    }
    let first = true;
    for (let i = 0; i < body.length; i += 4) {
      tokens.push((first ? lead : "") + body.slice(i, i + 4));
      first = false;
    }
  }
  return tokens;
}

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });

// The whole text at once (tokensPerSecond <= 0) or token by token at the given rate.
export async function* textDeltas(text, tokensPerSecond = 0, signal) {
  if (!(tokensPerSecond > 0)) {
    yield text;
    return;
  }
  const interval = 1000 / tokensPerSecond;
  const begin = performance.now();
  const tokens = splitLikeLlm(text);
  for (let i = 0; i < tokens.length; i++) {
    if (signal?.aborted) return;
    // Schedule against the start time so timer jitter does not accumulate.
    const wait = begin + i * interval - performance.now();
    if (wait > 0) await sleep(wait, signal);
    if (signal?.aborted) return;
    yield tokens[i];
  }
}

// Streams `choices[0].delta.content` from an OpenAI-compatible /chat/completions endpoint
// (Server-Sent Events: `data: {json}` lines, terminated by `data: [DONE]`).
export async function* chatCompletionDeltas({ url, apiKey, model, prompt, system, signal }) {
  const headers = { "Content-Type": "application/json", Accept: "text/event-stream" };
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  const messages = [];
  if (system) messages.push({ role: "system", content: system });
  messages.push({ role: "user", content: prompt });
  const response = await fetch(url, {
    method: "POST",
    headers,
    body: JSON.stringify({ model, messages, stream: true }),
    signal,
  });
  if (!response.ok) {
    const detail = (await response.text().catch(() => "")).slice(0, 300);
    throw new Error(`chat endpoint answered HTTP ${response.status}${detail ? `: ${detail}` : ""}`);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let pending = "";
  for (;;) {
    const { value, done } = await reader.read();
    pending += decoder.decode(value || new Uint8Array(), { stream: !done });
    const lines = pending.split(/\r?\n/);
    pending = done ? "" : lines.pop();
    for (const line of lines) {
      if (!line.startsWith("data:")) continue;
      const payload = line.slice(5).trim();
      if (payload === "[DONE]") return;
      if (!payload) continue;
      let event;
      try {
        event = JSON.parse(payload);
      } catch {
        throw new Error(`chat endpoint sent a line that is not JSON: ${payload.slice(0, 120)}`);
      }
      if (event.error) throw new Error(`chat endpoint error: ${event.error.message || JSON.stringify(event.error)}`);
      const content = event.choices?.[0]?.delta?.content;
      if (content) yield content;
    }
    if (done) return;
  }
}
