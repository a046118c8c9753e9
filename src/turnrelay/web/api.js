// The HTTP side of the page: JSON calls to /api/chat with the stored bearer
// token, and an SSE reader over fetch (EventSource can neither POST nor send an
// Authorization header).

const PREFIX = "/api/chat";
const TOKEN_KEY = "turnrelay.token";

/** An answer other than 2xx: `status`, and the API's `{detail, code}`. */
export class ApiError extends Error {
  constructor(status, detail, code) {
    super(detail || `HTTP ${status}`);
    this.status = status;
    this.code = code || "";
  }
}

export const token = {
  get: () => localStorage.getItem(TOKEN_KEY) || "",
  set: (value) => localStorage.setItem(TOKEN_KEY, value),
  clear: () => localStorage.removeItem(TOKEN_KEY),
};

async function request(method, path, { body, headers = {}, signal } = {}) {
  const h = { ...headers };
  const t = token.get();
  if (t) h.authorization = `Bearer ${t}`;
  if (body !== undefined) h["content-type"] = "application/json";
  const res = await fetch(PREFIX + path, {
    method,
    headers: h,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    cache: "no-store",
  });
  if (!res.ok) {
    let detail = "";
    let code = "";
    try {
      const j = await res.json();
      detail = j.detail;
      code = j.code;
    } catch {
      /* not JSON: keep the status line */
    }
    throw new ApiError(res.status, detail || `${res.status} ${res.statusText}`, code);
  }
  return res;
}

export async function call(method, path, options) {
  const res = await request(method, path, options);
  if (res.status === 204) return null;
  return res.json();
}

/** Open an SSE stream; the caller reads it with `readEvents`. */
export function openStream(method, path, options) {
  return request(method, path, options);
}

/**
 * Read SSE events from `res.body` and call `onEvent({id, data})` per event and
 * `onComment()` per comment line. `onBatch()` runs after each network read has
 * been parsed, so the caller can render and save once per batch rather than
 * per frame. Resolves when the body ends.
 */
export async function readEvents(res, { onEvent, onComment, onBatch }) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let id = null;
  let data = [];
  const dispatchLine = (line) => {
    if (line === "") {
      if (data.length) onEvent({ id, data: data.join("\n") });
      id = null;
      data = [];
    } else if (line.startsWith(":")) {
      onComment?.(line.slice(1).trim());
    } else {
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") data.push(value);
      else if (field === "id") id = value;
    }
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    // Lines end with \n, \r\n or \r; a trailing \r may be half of a \r\n.
    const parts = buffer.split(/\r\n|\n|\r(?!$)/);
    buffer = parts.pop();
    for (const line of parts) dispatchLine(line);
    onBatch?.();
  }
}
