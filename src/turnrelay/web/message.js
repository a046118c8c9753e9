// One message on the page. An assistant message is a list of parts (text,
// reasoning, tool calls) in the AI SDK UI message shape, so the same code draws
// a stored message (`parts` from GET /sessions/{id}) and a live one fed chunk by
// chunk. Each part keeps its own element, updated in place, so a tool card or a
// reasoning block that the reader opened stays open while the reply streams.
//
// A tool call that waits for the user's approval (state `approval-requested`) draws
// Approve and Deny in its card; a click dispatches a bubbling `tool-approval` event
// from the message's element, and the page sends the answer (app.js).

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
  awaiting_approval: "Waiting for your approval",
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

  /** The server took the user's answer to a tool's approval request. */
  answerApproval(toolCallId, approved) {
    const p = this.parts.find((x) => x.toolCallId === toolCallId);
    if (!p || p.state !== "approval-requested") return;
    p.state = "approval-responded";
    p.approval = { ...p.approval, approved };
    this._touch(p);
  }

  /** Approve or Deny was clicked; `release()` gives the buttons back if the answer failed. */
  _decide(part, approved, release) {
    const detail = { message: this, toolCallId: part.toolCallId, approvalId: part.approval?.id, approved, release };
    this.el.dispatchEvent(new CustomEvent("tool-approval", { bubbles: true, detail }));
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
      case "tool-approval-request": {
        const p = this._tool(c.toolCallId);
        p.approval = { id: c.approvalId };
        p.state = "approval-requested";
        this._touch(p);
        break;
      }
      case "tool-output-denied": {
        const p = this._tool(c.toolCallId);
        p.approval = { ...p.approval, approved: false };
        p.state = "output-denied";
        this._touch(p);
        break;
      }
      case "data-steer":
        // A message the user sent while this turn ran went into it here.
        this._add({ type: "data-steer", data: c.data });
        break;
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
      case "finish": {
        // A pause: the turn goes on once its approval requests are answered.
        const paused = c.messageMetadata?.status === "awaiting_approval";
        if (paused) this.setStatus("awaiting_approval");
        else if (this.status === "streaming") this.setStatus("completed");
        this.parts.forEach((p) => {
          if (p.state === "streaming") {
            p.state = "done";
            this._touch(p);
          } else if (!paused && (p.state === "approval-requested" || p.state === "approval-responded")) {
            // Ended unanswered (stopped): the call never ran, as the stored message says.
            const reason = this.status === "cancelled" ? "the turn was stopped" : p.approval?.reason;
            p.approval = { ...p.approval, approved: false, ...(reason ? { reason } : {}) };
            p.state = "output-denied";
            this._touch(p);
          }
        });
        break;
      }
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
    if (part.type === "data-steer") {
      const root = el("div", "steer");
      root.dataset.steer = "";
      return { root, update: (p) => (root.textContent = `↪ You: ${p.data?.text ?? ""}`) };
    }
    if (part.type.startsWith("tool-") || part.type === "dynamic-tool") {
      return toolCard((p, approved, release) => this._decide(p, approved, release));
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
  "approval-requested": "needs your approval",
  "output-available": "done",
  "output-error": "error",
  "output-denied": "denied",
};

function button(className, text) {
  const b = el("button", className, text);
  b.type = "button";
  return b;
}

/** A tool call's card; `decide(part, approved, release)` answers its approval request. */
function toolCard(decide) {
  const root = el("details", "card tool");
  const summary = el("summary");
  const name = el("span", "tool-name");
  const state = el("span", "tool-state");
  summary.append(el("span", "tool-icon", "⚙"), name, state);
  const inputLabel = el("div", "card-label", "Input");
  const input = el("pre", "card-pre");
  const approval = el("div", "approval");
  const approve = button("approve", "Approve");
  const deny = button("deny", "Deny");
  approval.append(el("span", "approval-question", "Run this tool?"), approve, deny);
  const outputLabel = el("div", "card-label", "Output");
  const output = el("pre", "card-pre");
  const body = el("div", "card-body");
  body.append(inputLabel, input, approval, outputLabel, output);
  root.append(summary, body);
  let part = null;
  let asking = false;
  const release = () => {
    approve.disabled = deny.disabled = false;
  };
  const choose = (approved) => {
    if (!part || approve.disabled) return;
    approve.disabled = deny.disabled = true;
    decide(part, approved, release);
  };
  approve.addEventListener("click", () => choose(true));
  deny.addEventListener("click", () => choose(false));
  return {
    root,
    update: (p) => {
      part = p;
      name.textContent = p.toolName || p.type.replace(/^tool-/, "");
      root.dataset.state = p.state || "";
      const answered = p.approval?.approved ? "approved, running…" : "denied";
      state.textContent = p.state === "approval-responded" ? answered : TOOL_STATE[p.state] || p.state || "";
      input.textContent = p.input != null ? pretty(p.input) : p.inputText || "";
      // A request opens its card once, so that it is seen; closing it again is the reader's choice.
      if (p.state === "approval-requested" && !asking) {
        root.open = true;
        release();
      }
      asking = p.state === "approval-requested";
      approval.hidden = !asking;
      const failed = p.state === "output-error";
      const denied = p.state === "output-denied";
      outputLabel.textContent = failed ? "Error" : denied ? "Denied" : "Output";
      output.classList.toggle("failed", failed);
      output.classList.toggle("denied", denied);
      if (failed) output.textContent = p.errorText || "";
      else if (denied) output.textContent = `Not run: ${p.approval?.reason || "the call was denied"}.`;
      else output.textContent = pretty(p.output);
      outputLabel.hidden = output.hidden = !failed && !denied && p.output === undefined;
    },
  };
}
