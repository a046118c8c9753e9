// One message on the page. An assistant message is a list of parts (text,
// reasoning, tool calls) in the AI SDK UI message shape, so the same code draws
// a stored message (`parts` from GET /sessions/{id}) and a live one fed chunk by
// chunk. Each part keeps its own element, updated in place, so a tool card or a
// reasoning block that the reader opened stays open while the reply streams.

import { renderMarkdown } from "./markdown.js";

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function pretty(value) {
  if (value === undefined || value === null) return "";
  if (typeof value === "string") return value;
  try {
    return JSON.stringify(value, null, 2);
  } catch {
    return String(value);
  }
}

export function userMessage(text) {
  const row = el("article", "msg user");
  const bubble = el("div", "bubble");
  bubble.append(renderMarkdown(text));
  row.append(bubble);
  return row;
}

const STATUS_LABEL = {
  queued: "Queued",
  streaming: "",
  completed: "",
  cancelled: "Stopped",
  failed: "Failed",
};

export class AssistantMessage {
  constructor({ id = "", turnId = "", status = "streaming" } = {}) {
    this.id = id;
    this.turnId = turnId;
    this.status = status;
    this.parts = []; // AI SDK UI message parts, plus `id` on text/reasoning
    this.errorText = "";
    this.notice = "";
    this.el = el("article", "msg assistant");
    this.body = el("div", "body");
    this.footer = el("div", "footer");
    this.el.append(this.body, this.footer);
    this._views = new Map(); // part -> {root, update}
    this._dirty = new Set();
    this._frame = 0;
    this._sync();
  }

  /** A stored message: its parts, status and (for a failed turn) the error. */
  static fromStored(m) {
    const view = new AssistantMessage({ id: m.id, turnId: m.turn_id, status: m.status });
    view.parts = (m.parts || []).filter((p) => p.type !== "step-start").map((p) => ({ ...p }));
    if (!view.parts.length && m.content) view.parts = [{ type: "text", text: m.content }];
    view.parts.forEach((p) => view._dirty.add(p));
    view.flush();
    return view;
  }

  /** What a reload needs to draw this message again before resuming its stream. */
  snapshot() {
    return {
      id: this.id,
      turnId: this.turnId,
      status: this.status,
      parts: this.parts,
      errorText: this.errorText,
      notice: this.notice,
    };
  }

  static fromSnapshot(s) {
    const view = new AssistantMessage({ id: s.id, turnId: s.turnId, status: s.status });
    view.parts = s.parts || [];
    view.errorText = s.errorText || "";
    view.notice = s.notice || "";
    view.parts.forEach((p) => view._dirty.add(p));
    view.flush();
    return view;
  }

  get text() {
    return this.parts
      .filter((p) => p.type === "text")
      .map((p) => p.text)
      .join("");
  }

  setStatus(status) {
    this.status = status;
    this._sync();
  }

  setError(text) {
    this.errorText = text;
    this._sync();
  }

  setNotice(text) {
    this.notice = text;
    this._sync();
  }

  /** Apply one UI message stream chunk. Rendering waits for `flush` or the next frame. */
  apply(c) {
    switch (c.type) {
      case "start":
        if (c.messageId) this.id = c.messageId;
        this.setStatus("streaming");
        break;
      case "text-start":
      case "reasoning-start": {
        const kind = c.type.split("-")[0];
        this._add({ type: kind, id: c.id, text: "", state: "streaming" });
        break;
      }
      case "text-delta":
      case "reasoning-delta": {
        const p = this._byId(c.id) || this._add({ type: c.type.split("-")[0], id: c.id, text: "", state: "streaming" });
        p.text += c.delta;
        this._touch(p);
        break;
      }
      case "text-end":
      case "reasoning-end": {
        const p = this._byId(c.id);
        if (p) {
          p.state = "done";
          this._touch(p);
        }
        break;
      }
      case "tool-input-start":
        this._tool(c.toolCallId, c.toolName);
        break;
      case "tool-input-delta": {
        const p = this._tool(c.toolCallId);
        p.inputText = (p.inputText || "") + c.inputTextDelta;
        this._touch(p);
        break;
      }
      case "tool-input-available": {
        const p = this._tool(c.toolCallId, c.toolName);
        p.input = c.input;
        p.state = "input-available";
        this._touch(p);
        break;
      }
      case "tool-output-available": {
        const p = this._tool(c.toolCallId);
        p.output = c.output;
        p.state = "output-available";
        this._touch(p);
        break;
      }
      case "tool-output-error": {
        const p = this._tool(c.toolCallId);
        p.errorText = c.errorText;
        p.state = "output-error";
        this._touch(p);
        break;
      }
      case "data-turn-retry":
        // A new attempt writes the answer again from the start (fresh part ids),
        // and only that attempt is stored: drop what the interrupted one wrote.
        this._clearParts();
        this.setNotice(`The turn was interrupted; retrying (attempt ${c.data?.attempt ?? "?"})…`);
        break;
      case "data-stream-reset":
        // The event log lost this turn's frames and starts it again from scratch.
        this._clearParts();
        break;
      case "error":
        this.setError(c.errorText || "The turn failed.");
        this.setStatus("failed");
        break;
      case "abort":
        this.setStatus("cancelled");
        break;
      case "finish":
        if (this.status === "streaming") this.setStatus("completed");
        this.parts.forEach((p) => {
          if (p.state === "streaming") {
            p.state = "done";
            this._touch(p);
          }
        });
        break;
      default:
        break; // start-step, finish-step, other data-* chunks: nothing to draw
    }
  }

  /** Render what changed now (the stream calls this once per network read). */
  flush() {
    if (this._frame) cancelAnimationFrame(this._frame);
    this._frame = 0;
    for (const p of this._dirty) this._render(p);
    this._dirty.clear();
  }

  _clearParts() {
    this.parts = [];
    this._dirty.clear();
    this._views.forEach((v) => v.root.remove());
    this._views.clear();
  }

  _add(part) {
    this.parts.push(part);
    this._touch(part);
    return part;
  }

  _byId(id) {
    return this.parts.find((p) => p.id === id && (p.type === "text" || p.type === "reasoning"));
  }

  _tool(callId, name) {
    let p = this.parts.find((x) => x.toolCallId === callId);
    if (!p) {
      p = this._add({ type: `tool-${name || "tool"}`, toolCallId: callId, state: "input-streaming", input: null });
    }
    return p;
  }

  _touch(part) {
    this._dirty.add(part);
    if (!this._frame) this._frame = requestAnimationFrame(() => this.flush());
  }

  _render(part) {
    let view = this._views.get(part);
    if (!view) {
      view = this._makeView(part);
      if (!view) return;
      this._views.set(part, view);
      this.body.append(view.root);
    }
    view.update(part);
  }

  _makeView(part) {
    if (part.type === "text") {
      const root = el("div", "text md");
      return { root, update: (p) => root.replaceChildren(renderMarkdown(p.text)) };
    }
    if (part.type === "reasoning") {
      const root = el("details", "card reasoning");
      const summary = el("summary");
      const content = el("div", "card-body md");
      root.append(summary, content);
      return {
        root,
        update: (p) => {
          summary.textContent = p.state === "streaming" ? "Thinking…" : "Reasoning";
          content.replaceChildren(renderMarkdown(p.text));
        },
      };
    }
    if (part.type.startsWith("tool-") || part.type === "dynamic-tool") {
      return toolCard();
    }
    return null;
  }

  _sync() {
    const label = STATUS_LABEL[this.status] ?? this.status;
    this.el.dataset.status = this.status;
    if (this.id) this.el.dataset.messageId = this.id;
    if (this.turnId) this.el.dataset.turnId = this.turnId;
    this.el.classList.toggle("streaming", this.status === "streaming" || this.status === "queued");
    const nodes = [];
    if (this.notice) nodes.push(el("div", "notice", this.notice));
    if (this.errorText) {
      const line = el("div", "error-line", this.errorText);
      line.setAttribute("role", "alert");
      nodes.push(line);
    }
    if (label) nodes.push(el("span", `badge ${this.status}`, label));
    this.footer.replaceChildren(...nodes);
  }
}

const TOOL_STATE = {
  "input-streaming": "preparing…",
  "input-available": "running…",
  "output-available": "done",
  "output-error": "error",
};

function toolCard() {
  const root = el("details", "card tool");
  const summary = el("summary");
  const name = el("span", "tool-name");
  const state = el("span", "tool-state");
  summary.append(el("span", "tool-icon", "⚙"), name, state);
  const inputLabel = el("div", "card-label", "Input");
  const input = el("pre", "card-pre");
  const outputLabel = el("div", "card-label", "Output");
  const output = el("pre", "card-pre");
  const body = el("div", "card-body");
  body.append(inputLabel, input, outputLabel, output);
  root.append(summary, body);
  return {
    root,
    update: (p) => {
      name.textContent = p.toolName || p.type.replace(/^tool-/, "");
      state.textContent = TOOL_STATE[p.state] || p.state || "";
      root.dataset.state = p.state || "";
      input.textContent = p.input != null ? pretty(p.input) : p.inputText || "";
      const failed = p.state === "output-error";
      outputLabel.textContent = failed ? "Error" : "Output";
      output.classList.toggle("failed", failed);
      output.textContent = failed ? p.errorText || "" : pretty(p.output);
      outputLabel.hidden = output.hidden = !failed && p.output === undefined;
    },
  };
}
