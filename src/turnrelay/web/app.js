// The chat page: session list, composer, and one live turn stream at a time.
//
// Resuming. Every frame carries `id: <turn_id>:<seq>`. After each network read
// the page saves, in sessionStorage under the session's id, the cursor (the last
// id) together with the assistant message as drawn up to that cursor. A reload
// draws that snapshot and asks for the frames after the cursor
// (`Last-Event-ID`), so nothing is shown twice and nothing is missed. Without a
// snapshot (another tab, or storage cleared) the page reads the active turn from
// its first frame (`?turn_id=`) into an empty message instead, and draws the
// stored messages of every other turn. A stream that breaks without `[DONE]` is
// read again from the cursor, with backoff.
//
// Approvals. A turn whose tool needs the user's approval ends its stream with a
// pause (`finish` with `messageMetadata.status: "awaiting_approval"`) but goes on
// running: the page keeps the pause's cursor and snapshot, and the tool's card
// asks. Once every request is answered (POST .../approvals) the page reads on
// from that cursor. A reload while the turn waits draws the snapshot, or, in
// another tab, the stored message (its tool parts say `approval-requested`) with
// the active turn's `last_event_id` as the cursor.

import { ApiError, call, openStream, readEvents, token } from "./api.js";
import { AssistantMessage, userMessage } from "./message.js";

const $ = (id) => document.getElementById(id);
const ui = {
  sessions: $("sessions"),
  newChat: $("new-chat"),
  title: $("chat-title"),
  conn: $("conn"),
  messages: $("messages"),
  empty: $("empty"),
  composer: $("composer"),
  input: $("input"),
  send: $("send"),
  stop: $("stop"),
  who: $("who"),
  changeToken: $("change-token"),
  auth: $("auth"),
  authForm: $("auth-form"),
  authReason: $("auth-reason"),
  authToken: $("auth-token"),
};

// Retry delays after a broken stream: doubling from 0.5 s up to 8 s, with jitter
// so that many pages losing one server do not come back in step.
const BACKOFF_MS = [500, 1000, 2000, 4000, 8000];

// While a turn waits for approvals, how often the page asks whether it still does,
// so that an answer from elsewhere (another tab, the API, the timeout's denial)
// shows without a reload. Only while this page shows a waiting turn.
const PAUSE_CHECK_MS = 3000;

const state = {
  sessions: [],
  sessionId: null,
  live: null, // the AssistantMessage being streamed, if any
  follow: null, // AbortController of the stream being read
  paused: null, // {sid, live, turnId, cursor} of a turn waiting for approvals
  stopping: false,
  opening: null, // the load of the session being opened, until it is drawn
};

// -- small helpers ---------------------------------------------------------------------

function uuid() {
  if (crypto.randomUUID) return crypto.randomUUID();
  // crypto.randomUUID needs a secure context; a page served over plain http on
  // a LAN address is not one.
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(t);
      resolve();
    });
  });
}

function ago(iso) {
  if (!iso) return "";
  const s = (Date.now() - new Date(iso).getTime()) / 1000;
  if (s < 60) return "just now";
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return new Date(iso).toLocaleDateString();
}

const snapKey = (sid) => `turnrelay.live.${sid}`;

function loadSnapshot(sid) {
  try {
    return JSON.parse(sessionStorage.getItem(snapKey(sid)) || "null");
  } catch {
    return null;
  }
}

function saveSnapshot(sid, cursor, live) {
  try {
    sessionStorage.setItem(snapKey(sid), JSON.stringify({ cursor, message: live.snapshot() }));
  } catch {
    /* storage full or disabled: a reload then replays the turn from its start */
  }
}

function setConn(text) {
  ui.conn.textContent = text;
  ui.conn.hidden = !text;
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.stop.disabled = false;
  ui.stop.textContent = "■ Stop";
  state.stopping = false;
}

function scrollToEnd(force = false) {
  const m = ui.messages;
  if (force || m.scrollHeight - m.scrollTop - m.clientHeight < 120) m.scrollTop = m.scrollHeight;
}

// -- errors and the token --------------------------------------------------------------

let authWaiters = [];

function askForToken(reason) {
  ui.authReason.textContent = reason;
  ui.auth.hidden = false;
  ui.authToken.value = "";
  ui.authToken.focus();
  return new Promise((resolve) => authWaiters.push(resolve));
}

ui.authForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const value = ui.authToken.value.trim();
  if (!value) return;
  token.set(value);
  ui.auth.hidden = true;
  const waiters = authWaiters;
  authWaiters = [];
  waiters.forEach((w) => w());
  boot();
});

ui.changeToken.addEventListener("click", () => {
  askForToken("Enter a new API token.");
});

/** Show a failed call; a 401 asks for a token (and reloads everything once it is given). */
function report(err) {
  if (err instanceof ApiError && err.status === 401) {
    askForToken(token.get() ? "That token was not accepted. Enter another one." : "This server needs an API token.");
    return;
  }
  if (err?.name === "AbortError") return;
  const line = document.createElement("div");
  line.className = "error-line toast";
  line.setAttribute("role", "alert");
  line.textContent = err instanceof ApiError ? err.message : `Network error: ${err?.message || err}`;
  ui.messages.append(line);
  scrollToEnd(true);
}

// -- sessions --------------------------------------------------------------------------

async function loadSessions() {
  const data = await call("GET", "/sessions?limit=100");
  state.sessions = data.sessions;
  renderSessions();
}

function renderSessions() {
  const items = state.sessions.map((s) => {
    const item = document.createElement("div");
    item.className = "session" + (s.id === state.sessionId ? " active" : "");
    item.dataset.sessionId = s.id;
    const open = document.createElement("button");
    open.type = "button";
    open.className = "session-open";
    const title = document.createElement("span");
    title.className = "session-title";
    title.textContent = s.title || "New chat";
    const when = document.createElement("span");
    when.className = "session-when";
    when.textContent = ago(s.updated_at || s.created_at);
    open.append(title, when);
    open.addEventListener("click", () => go(s.id));
    const del = document.createElement("button");
    del.type = "button";
    del.className = "session-delete";
    del.title = "Delete chat";
    del.textContent = "✕";
    // Two clicks: the first arms the button for three seconds.
    del.addEventListener("click", async (e) => {
      e.stopPropagation();
      if (!del.classList.contains("armed")) {
        del.classList.add("armed");
        del.textContent = "Delete?";
        setTimeout(() => {
          del.classList.remove("armed");
          del.textContent = "✕";
        }, 3000);
        return;
      }
      await deleteSession(s.id);
    });
    item.append(open, del);
    return item;
  });
  ui.sessions.replaceChildren(...items);
  const current = state.sessions.find((s) => s.id === state.sessionId);
  ui.title.textContent = current?.title || "New chat";
}

async function deleteSession(sid) {
  if (sid === state.sessionId) stopFollowing(); // its stream is about to end anyway
  try {
    await call("DELETE", `/sessions/${sid}`);
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 404)) return report(err);
  }
  sessionStorage.removeItem(snapKey(sid));
  if (sid === state.sessionId) go(null);
  await loadSessions().catch(report);
}

async function newChat() {
  try {
    const s = await call("POST", "/sessions");
    state.sessions.unshift({ id: s.id, title: null, created_at: s.created_at, updated_at: s.created_at });
    go(s.id);
  } catch (err) {
    report(err);
  }
}

/** Navigate: the session id lives in the URL hash, so a reload comes back to it. */
function go(sid) {
  const hash = sid ? `#/s/${sid}` : "#/";
  if (location.hash !== hash) location.hash = hash; // hashchange then opens it
  else openSession(sid);
}

function routeSession() {
  const m = location.hash.match(/^#\/s\/([\w-]+)$/);
  return m ? m[1] : null;
}

// -- one session -----------------------------------------------------------------------

function stopFollowing() {
  state.follow?.abort();
  state.follow = null;
  state.live = null;
  state.paused = null;
  setBusy(false);
  setConn("");
}

function clearMessages() {
  ui.messages.replaceChildren(ui.empty);
  ui.empty.hidden = false;
}

function appendMessage(node) {
  ui.empty.hidden = true;
  ui.messages.append(node);
}

/** Open a session; a send waits for it, so a late answer never redraws over a new turn. */
function openSession(sid) {
  const opening = loadSession(sid);
  state.opening = opening;
  opening.finally(() => {
    if (state.opening === opening) state.opening = null;
  });
  return opening;
}

async function loadSession(sid) {
  stopFollowing();
  state.sessionId = sid;
  renderSessions();
  clearMessages();
  if (!sid) return;
  let detail;
  try {
    detail = await call("GET", `/sessions/${sid}`);
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) {
      sessionStorage.removeItem(snapKey(sid));
      go(null);
      return;
    }
    return report(err);
  }
  if (state.sessionId !== sid) return; // the reader moved on meanwhile
  showSession(detail);
}

function showSession(detail) {
  const sid = detail.id;
  const active = detail.active_turn;
  ui.title.textContent = detail.title || "New chat";
  clearMessages();
  let liveAnchor = null;
  let liveStored = null;
  for (const m of detail.messages) {
    if (m.role === "user") {
      const node = userMessage(m.content);
      node.dataset.turnId = m.turn_id;
      appendMessage(node);
      if (active && m.turn_id === active.turn_id) liveAnchor = node;
    } else if (active && m.turn_id === active.turn_id) {
      liveStored = m;
    } else {
      const view = AssistantMessage.fromStored(m);
      appendMessage(view.el);
      if (m.status === "failed") explainFailure(sid, view);
    }
  }
  scrollToEnd(true);
  if (!active) {
    sessionStorage.removeItem(snapKey(sid));
    return;
  }
  // The active turn is drawn live: from the saved snapshot when it belongs to
  // this turn, else (waiting for approvals) from its stored message up to its
  // last frame, else from the turn's first frame.
  const snap = loadSnapshot(sid);
  let live;
  let cursor = null;
  if (snap?.message?.turnId === active.turn_id && snap.cursor?.startsWith(`${active.turn_id}:`)) {
    live = AssistantMessage.fromSnapshot(snap.message);
    cursor = snap.cursor;
  } else if (active.waiting_for_approval && liveStored && active.last_event_id) {
    // The stream may have expired while the turn waited; the stored message has it all.
    live = AssistantMessage.fromStored(liveStored);
    live.setStatus("awaiting_approval");
    cursor = active.last_event_id;
  } else {
    live = new AssistantMessage({ turnId: active.turn_id, status: active.status === "queued" ? "queued" : "streaming" });
  }
  if (liveAnchor) liveAnchor.after(live.el);
  else appendMessage(live.el);
  ui.empty.hidden = true;
  follow(sid, live, { turnId: active.turn_id, cursor });
}

/** A stored failed message has no error text: the turn has it. */
async function explainFailure(sid, view) {
  try {
    const turn = await call("GET", `/sessions/${sid}/turns/${view.turnId}`);
    view.setError(turn.error || "The turn failed.");
  } catch {
    view.setError("The turn failed.");
  }
}

// -- the live stream -------------------------------------------------------------------

/**
 * Read one turn's stream into `live` until `[DONE]`. `post` submits a new turn
 * (POST /stream); otherwise the turn is read from `cursor`, or from its start.
 */
async function follow(sid, live, { post = null, turnId = null, cursor = null }) {
  const ctrl = new AbortController();
  state.follow = ctrl;
  state.live = live;
  setBusy(true);
  let failures = 0;
  let done = false;
  let tid = turnId;

  const onEvent = ({ id, data }) => {
    if (data === "[DONE]") {
      done = true;
      return;
    }
    let chunk;
    try {
      chunk = JSON.parse(data);
    } catch {
      return;
    }
    live.apply(chunk);
    if (id) {
      cursor = id;
      tid = id.slice(0, id.lastIndexOf(":"));
      live.turnId = tid;
    }
    failures = 0;
    if (state.follow === ctrl) setConn("");
  };
  const paused = () => done && live.status === "awaiting_approval";
  const onBatch = () => {
    live.flush();
    if (done && !paused()) sessionStorage.removeItem(snapKey(sid));
    else if (cursor) saveSnapshot(sid, cursor, live);
    scrollToEnd();
  };

  while (!done && !ctrl.signal.aborted) {
    try {
      let res;
      if (post && !cursor) {
        // Resubmitting after a failed attempt is safe: the same message_id
        // answers with the same turn and its stream from the start.
        res = await openStream("POST", `/sessions/${sid}/stream`, { body: post, signal: ctrl.signal });
        if (!tid) tid = res.headers.get("x-turn-id");
        if (state.follow === ctrl) loadSessions().catch(() => {}); // the first message names the chat
      } else {
        const headers = cursor ? { "last-event-id": cursor } : {};
        const query = !cursor && tid ? `?turn_id=${encodeURIComponent(tid)}` : "";
        res = await openStream("GET", `/sessions/${sid}/stream${query}`, { headers, signal: ctrl.signal });
      }
      if (res.status === 204) {
        // Nothing active any more. A turn drawn as waiting ended meanwhile: show it as stored.
        if (live.status === "awaiting_approval" && state.follow === ctrl) {
          sessionStorage.removeItem(snapKey(sid));
          openSession(state.sessionId);
          return;
        }
        break;
      }
      await readEvents(res, { onEvent, onBatch });
      if (done) break;
    } catch (err) {
      if (ctrl.signal.aborted) return;
      if (err instanceof ApiError) {
        if (err.status === 401) {
          // Once a token is given, boot() opens the session again and resumes
          // from the saved snapshot.
          report(err);
          return;
        }
        if (err.status === 410 || err.status === 404) {
          // The stream expired (or the session went away): show what is stored.
          sessionStorage.removeItem(snapKey(sid));
          if (state.follow === ctrl) openSession(state.sessionId);
          return;
        }
        if (err.status < 500) {
          live.setError(err.message);
          live.setStatus("failed");
          break;
        }
      }
    }
    if (ctrl.signal.aborted) return;
    const delay = BACKOFF_MS[Math.min(failures, BACKOFF_MS.length - 1)] * (0.75 + Math.random() * 0.5);
    failures += 1;
    if (state.follow === ctrl) setConn(`Reconnecting… (attempt ${failures})`);
    await sleep(delay, ctrl.signal);
  }
  if (ctrl.signal.aborted || state.follow !== ctrl) return;
  live.flush();
  if (paused()) {
    // The turn waits for the user's answer (the tool's card asks); Stop still cancels it.
    state.follow = null;
    state.live = null;
    state.paused = { sid, live, turnId: tid, cursor };
    setConn("");
    watchPause(state.paused);
    return;
  }
  if (live.status === "streaming" || live.status === "queued") live.setStatus("completed");
  sessionStorage.removeItem(snapKey(sid));
  state.follow = null;
  state.live = null;
  setBusy(false);
  setConn("");
  await afterTurn(sid, tid);
}

/** A finished turn may have queued turns behind it: follow the next one. */
async function afterTurn(sid, finishedTurnId) {
  try {
    await loadSessions();
    const detail = await call("GET", `/sessions/${sid}`);
    if (state.sessionId !== sid || state.follow) return;
    if (detail.active_turn && detail.active_turn.turn_id !== finishedTurnId) showSession(detail);
  } catch (err) {
    if (state.sessionId !== sid || (err instanceof ApiError && err.status === 404)) return;
    report(err);
  }
}

/** Read on from the pause once the turn goes on (answered, or cancelled). */
function resume() {
  const { sid, live, turnId, cursor } = state.paused;
  state.paused = null;
  follow(sid, live, { turnId, cursor });
}

/** Read on once the paused turn no longer waits, whoever answered it. */
async function watchPause(paused) {
  while (state.paused === paused) {
    await sleep(PAUSE_CHECK_MS);
    if (state.paused !== paused) return;
    let turn;
    try {
      turn = await call("GET", `/sessions/${paused.sid}/turns/${paused.turnId}`);
    } catch (err) {
      if (err instanceof ApiError && err.status < 500) return; // gone, or no longer ours
      continue; // the next check tries again; the buttons work meanwhile
    }
    if (state.paused !== paused) return;
    for (const a of turn.approvals) {
      if (a.status !== "waiting") paused.live.answerApproval(a.tool_call_id, a.status === "approved");
    }
    if (!turn.waiting_for_approval) resume();
  }
}

/** Approve or Deny in a tool's card: send the answer, then read on once none is left. */
async function decide({ message, toolCallId, approvalId, approved, release }) {
  const sid = state.sessionId;
  if (!sid || !message.turnId || !approvalId) return release();
  let waiting = false;
  try {
    const answer = await call("POST", `/sessions/${sid}/turns/${message.turnId}/approvals`, {
      body: { decisions: [{ approval_id: approvalId, approved }] },
    });
    waiting = answer.waiting;
    message.answerApproval(toolCallId, approved);
  } catch (err) {
    // 409: answered already (another tab, the timeout) or cancelled; the stream shows how it went on.
    if (!(err instanceof ApiError && err.status === 409)) {
      release();
      return report(err);
    }
  }
  const paused = state.paused;
  if (state.sessionId !== sid || paused?.live !== message) return; // a stream is read already
  if (waiting) saveSnapshot(sid, paused.cursor, message); // other requests of the pause still ask
  else resume();
}

async function send() {
  const text = ui.input.value.trim();
  if (!text) return;
  // The session's stored messages are drawn first (its answer replaces the view).
  while (state.opening) await state.opening.catch(() => {});
  if (state.paused) return; // a waiting turn is answered (or stopped) first
  if (state.follow && state.sessionId) return steer(state.sessionId, text);
  let sid = state.sessionId;
  if (!sid) {
    try {
      const s = await call("POST", "/sessions");
      sid = s.id;
      state.sessions.unshift({ id: sid, title: null, created_at: s.created_at, updated_at: s.created_at });
      state.sessionId = sid;
      history.replaceState(null, "", `#/s/${sid}`);
      renderSessions();
    } catch (err) {
      return report(err);
    }
  }
  ui.input.value = "";
  autosize();
  appendMessage(userMessage(text));
  const live = new AssistantMessage();
  appendMessage(live.el);
  scrollToEnd(true);
  follow(sid, live, { post: { message: text, message_id: uuid() } });
}

// A message typed while a turn runs steers it: the server hands it to the
// turn before its next model request (the stream shows where, as data-steer);
// if the turn ends first it is the next turn, which afterTurn then follows.
async function steer(sid, text) {
  ui.input.value = "";
  autosize();
  try {
    await call("POST", `/sessions/${sid}/turns`, {
      body: { message: text, message_id: uuid(), multitask: "steer" },
    });
  } catch (err) {
    ui.input.value = text;
    report(err);
  }
}

async function stop() {
  const sid = state.sessionId;
  if (!sid || state.stopping) return;
  state.stopping = true;
  ui.stop.disabled = true;
  ui.stop.textContent = "Stopping…";
  try {
    await call("POST", `/sessions/${sid}/cancel`);
    // The stream itself brings `abort`, `finish` and `[DONE]`; a paused turn's
    // is read on from its pause for them.
    if (state.paused?.sid === sid) resume();
  } catch (err) {
    ui.stop.disabled = false;
    ui.stop.textContent = "■ Stop";
    state.stopping = false;
    report(err);
  }
}

// -- composer --------------------------------------------------------------------------

function autosize() {
  ui.input.style.height = "auto";
  ui.input.style.height = `${Math.min(ui.input.scrollHeight, 200)}px`;
}

ui.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});
ui.input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
ui.input.addEventListener("input", autosize);
ui.stop.addEventListener("click", stop);
ui.messages.addEventListener("tool-approval", (e) => decide(e.detail));
ui.newChat.addEventListener("click", newChat);
window.addEventListener("hashchange", () => openSession(routeSession()));

// -- start -----------------------------------------------------------------------------

async function boot() {
  ui.changeToken.hidden = !token.get();
  ui.who.textContent = token.get() ? "Signed in with a token" : "";
  try {
    await loadSessions();
  } catch (err) {
    return report(err);
  }
  await openSession(routeSession());
  ui.input.focus();
}

boot();
