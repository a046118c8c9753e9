// Drives the chat page in headless Chromium (Debian's /usr/bin/chromium through
// playwright-core; Playwright's own browsers are never downloaded) against a
// real `turnrelay serve` with `turnrelay fake-llm` behind it.
//
//   node chat.spec.mjs '{"baseUrl": "...", "outDir": "...", "scenario": "send"}'
//
// Runs one scenario and prints one JSON line: {ok, scenario, result, screenshots,
// pageErrors, error?}. The pytest side (test_chat_page.py) asserts on `result`,
// so this script only drives the page and measures; it fails only when the page
// cannot be driven at all (a wait that times out, a missing element).

import { mkdirSync } from "node:fs";
import net from "node:net";
import { join } from "node:path";
import { chromium } from "playwright-core";

const config = JSON.parse(process.argv[2] || "{}");
const { baseUrl, outDir, scenario } = config;
const CHROMIUM = config.chromium || "/usr/bin/chromium";
const screenshots = [];
const pageErrors = [];

const tokens = (n) => Array.from({ length: n }, (_, i) => `t${i}`).join(" ");
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function shot(page, name) {
  const path = join(outDir, `${scenario}-${String(screenshots.length + 1).padStart(2, "0")}-${name}.png`);
  await page.screenshot({ path });
  screenshots.push(path);
}

function watch(page) {
  page.on("pageerror", (err) => pageErrors.push(String(err)));
  const requests = [];
  page.on("request", (req) => {
    if (req.url().includes("/stream")) {
      requests.push({ method: req.method(), url: req.url(), lastEventId: req.headers()["last-event-id"] || null });
    }
  });
  return requests;
}

const lastAssistant = (page) => page.locator(".msg.assistant").last();

/** The text parts of the last assistant message, as rendered. */
function liveText(page) {
  return page.evaluate(() => {
    const all = document.querySelectorAll(".msg.assistant");
    const last = all[all.length - 1];
    if (!last) return "";
    return [...last.querySelectorAll(".body > .text")].map((e) => e.textContent).join("");
  });
}

async function waitTokens(page, n, timeout = 20000) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const text = await liveText(page);
    if (text.split(" ").filter(Boolean).length >= n) return text;
    if (Date.now() > deadline) throw new Error(`fewer than ${n} tokens after ${timeout} ms: ${JSON.stringify(text)}`);
    await sleep(25);
  }
}

/** Wait until the last assistant message has `status` (an earlier one may have it already). */
async function waitStatus(page, status, timeout = 30000) {
  await page.waitForFunction(
    (want) => {
      const all = document.querySelectorAll(".msg.assistant");
      return all.length > 0 && all[all.length - 1].dataset.status === want;
    },
    status,
    { timeout, polling: 20 }
  );
}

/**
 * A TCP proxy in front of the server whose `cut(ms)` resets every open
 * connection and refuses new ones for `ms`: a real network loss as the browser
 * sees it (going offline in Chromium leaves an open stream untouched).
 */
async function startProxy(target) {
  const { hostname, port } = new URL(target);
  const sockets = new Set();
  let down = false;
  const server = net.createServer((client) => {
    if (down) return client.destroy();
    const upstream = net.connect(Number(port), hostname);
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on("close", () => sockets.delete(s));
      s.on("error", () => {});
    }
    client.pipe(upstream).pipe(client);
    client.on("close", () => upstream.destroy());
    upstream.on("close", () => client.destroy());
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    async cut(ms) {
      down = true;
      for (const s of sockets) s.resetAndDestroy ? s.resetAndDestroy() : s.destroy();
      await sleep(ms);
      down = false;
    },
    close: () => {
      for (const s of sockets) s.destroy();
      server.close();
    },
  };
}

async function sendMessage(page, text) {
  await page.locator("#input").fill(text);
  await page.locator("#input").press("Enter");
}

const sessionOf = (page) => (new URL(page.url()).hash.match(/^#\/s\/(.+)$/) || [])[1] || null;

// -- scenarios --------------------------------------------------------------------------

const scenarios = {
  /** The API docs page, with every request off the server refused: it must work offline. */
  async docs(context) {
    const offServer = [];
    await context.route("**/*", (route) => {
      const url = route.request().url();
      if (url.startsWith(baseUrl)) return route.continue();
      offServer.push(url);
      return route.abort();
    });
    const page = await context.newPage();
    watch(page);
    await page.goto(`${baseUrl}/docs`);
    await page.locator("details.op").first().waitFor();
    const operations = await page.locator("main > details.op[id^='op-']").evaluateAll((els) =>
      els.map((e) => e.querySelector("summary").textContent.split(" — ")[0].trim())
    );
    // the submit operation lists its body and its error answers
    const submit = page.locator("#op-submitTurn");
    await submit.locator("summary").click();
    const submitText = await submit.textContent();
    // a schema link opens that schema
    await submit.locator("a[href='#schema-TransportRequest']").first().click();
    await page.locator("#schema-TransportRequest[open]").waitFor();
    const schemaText = await page.locator("#schema-TransportRequest").textContent();
    await shot(page, "docs");
    return { operations, submitText, schemaText, offServer, title: await page.title() };
  },

  /** A message typed while a turn runs steers it: it shows where it went in. */
  async steer(context) {
    const page = await context.newPage();
    watch(page);
    await page.goto(baseUrl);
    await page.locator("#empty").waitFor();
    await sendMessage(page, "loop fake:tool=current_time fake:steps=3 fake:delay_ms=300");
    await lastAssistant(page).locator(".card.tool").first().waitFor({ timeout: 15000 });
    const busyWhenTyped = await page.locator("#stop").isVisible();
    await sendMessage(page, "also check Paris fake:aside");
    await lastAssistant(page).locator(".steer").waitFor({ timeout: 15000 });
    await shot(page, "steered");
    await waitStatus(page, "completed", 30000);
    await shot(page, "done");
    return {
      busyWhenTyped,
      steer: await lastAssistant(page).locator(".steer").allTextContents(),
      userMessages: await page.locator(".msg.user").count(),
      assistantMessages: await page.locator(".msg.assistant").count(),
      sessionId: sessionOf(page),
    };
  },

  async send(context) {
    const page = await context.newPage();
    watch(page);
    await page.goto(baseUrl);
    await page.locator("#empty").waitFor();
    await sendMessage(page, "count for me fake:tokens=30 fake:delay_ms=20");
    const lengths = new Set();
    let midShot = false;
    const deadline = Date.now() + 20000;
    while (Date.now() < deadline) {
      const status = await lastAssistant(page).getAttribute("data-status").catch(() => null);
      const text = await liveText(page);
      lengths.add(text.length);
      if (!midShot && text.split(" ").length >= 10 && status === "streaming") {
        await shot(page, "streaming");
        midShot = true;
      }
      if (status === "completed") break;
      await sleep(15);
    }
    await waitStatus(page, "completed", 5000);
    await shot(page, "completed");
    return {
      text: await liveText(page),
      expected: tokens(30),
      distinctLengths: lengths.size,
      sessionId: sessionOf(page),
      userMessages: await page.locator(".msg.user").count(),
      assistantMessages: await page.locator(".msg.assistant").count(),
      sendVisible: await page.locator("#send").isVisible(),
      activeSessionTitle: await page.locator(".session.active .session-title").textContent(),
    };
  },

  async stop(context) {
    const page = await context.newPage();
    watch(page);
    await page.goto(baseUrl);
    await sendMessage(page, "a long one fake:tokens=400 fake:delay_ms=30");
    await waitTokens(page, 20);
    await shot(page, "before-stop");
    await page.locator("#stop").click();
    await waitStatus(page, "cancelled", 15000);
    const atStop = await liveText(page);
    await sleep(1200);
    const later = await liveText(page);
    await shot(page, "stopped");
    return {
      atStop,
      later,
      full: tokens(400),
      badge: await lastAssistant(page).locator(".badge").textContent(),
      turnId: await lastAssistant(page).getAttribute("data-turn-id"),
      sessionId: sessionOf(page),
      stopVisible: await page.locator("#stop").isVisible(),
      sendVisible: await page.locator("#send").isVisible(),
    };
  },

  async reload(context) {
    const page = await context.newPage();
    const requests = watch(page);
    await page.goto(baseUrl);
    await sendMessage(page, "resume me fake:tokens=80 fake:delay_ms=40");
    const before = await waitTokens(page, 15);
    const marker = requests.length;
    await page.reload();
    await page.locator(".msg.assistant").first().waitFor();
    const afterReload = await liveText(page);
    await shot(page, "after-reload");
    await waitStatus(page, "completed", 20000);
    await shot(page, "resumed-completed");
    const withCursor = {
      before,
      afterReload,
      text: await liveText(page),
      assistantMessages: await page.locator(".msg.assistant").count(),
      userMessages: await page.locator(".msg.user").count(),
      requestsAfterReload: requests.slice(marker),
    };

    // A second turn, opened mid-reply in a new tab: no saved cursor there, so the
    // page reads the active turn from its start, beside the stored first turn.
    const sid = sessionOf(page);
    await sendMessage(page, "again fake:tokens=80 fake:delay_ms=40");
    await waitTokens(page, 15);
    const tab = await context.newPage();
    const tabRequests = watch(tab);
    await tab.goto(`${baseUrl}/#/s/${sid}`);
    await waitStatus(tab, "completed", 20000);
    await page.locator(".msg.assistant").nth(1).and(page.locator('[data-status="completed"]')).waitFor();
    const texts = (p) =>
      p.$$eval(".msg.assistant", (els) =>
        els.map((el) => [...el.querySelectorAll(".body > .text")].map((e) => e.textContent).join(""))
      );
    await shot(tab, "new-tab-completed");
    return {
      expected: tokens(80),
      withCursor,
      newTab: {
        texts: await texts(tab),
        requests: tabRequests,
      },
      firstTabTexts: await texts(page),
    };
  },

  async network(context) {
    const proxy = await startProxy(baseUrl);
    try {
      const page = await context.newPage();
      const requests = watch(page);
      await page.goto(proxy.url);
      await sendMessage(page, "flaky network fake:tokens=80 fake:delay_ms=40");
      const beforeCut = await waitTokens(page, 10);
      // Down for 2.5 s: the page's first retries fail too, so backoff is exercised.
      const cut = proxy.cut(2500);
      await page.locator("#conn").waitFor({ state: "visible", timeout: 5000 });
      const connText = await page.locator("#conn").textContent();
      await sleep(1200);
      await shot(page, "network-down");
      const duringCut = await liveText(page);
      await cut;
      await waitStatus(page, "completed", 30000);
      await shot(page, "back-online");
      return {
        beforeCut,
        duringCut,
        connText,
        text: await liveText(page),
        expected: tokens(80),
        resumedWithCursor: requests.filter((r) => r.method === "GET" && r.lastEventId).length,
        connHiddenAtEnd: await page.locator("#conn").isHidden(),
      };
    } finally {
      proxy.close();
    }
  },

  async error(context) {
    const page = await context.newPage();
    watch(page);
    await page.goto(baseUrl);
    await sendMessage(page, "please break fake:fail_after=3 fake:tokens=10");
    await waitStatus(page, "failed", 20000);
    const live = await lastAssistant(page).locator(".error-line").textContent();
    await shot(page, "failed");
    await page.reload();
    await lastAssistant(page).locator(".error-line").waitFor();
    const stored = await lastAssistant(page).locator(".error-line").textContent();
    return {
      live,
      stored,
      text: await liveText(page),
      badge: await lastAssistant(page).locator(".badge").textContent(),
      sendVisible: await page.locator("#send").isVisible(),
    };
  },

  async sessions(context) {
    const page = await context.newPage();
    watch(page);
    await page.goto(baseUrl);
    const tag = Math.random().toString(36).slice(2, 8);
    const names = ["alpha", "beta", "gamma"].map((n) => `${n} ${tag}`);
    const ids = [];
    for (const name of names) {
      await page.locator("#new-chat").click();
      await page.waitForFunction(() => /^#\/s\//.test(location.hash));
      await page.locator("#empty").waitFor();
      await sendMessage(page, name);
      await waitStatus(page, "completed");
      ids.push(sessionOf(page));
      await page.locator(".session.active .session-title", { hasText: name }).waitFor();
    }
    const titles = async () => page.locator(".session .session-title").allTextContents();
    const titlesBefore = await titles();
    const shown = {};
    for (const [k, name] of names.entries()) {
      await page.locator(`.session[data-session-id="${ids[k]}"] .session-open`).click();
      // The title changes at once, the messages when the session's GET answers:
      // wait for this session's own messages, not the previous one's.
      await page.locator("#chat-title", { hasText: name }).waitFor();
      await page.locator(".msg.user", { hasText: name }).waitFor();
      await page.locator(".msg.assistant", { hasText: `Echo: ${name}` }).waitFor();
      shown[name] = {
        user: await page.locator(".msg.user").allTextContents(),
        assistant: await liveText(page),
        title: await page.locator("#chat-title").textContent(),
        hashId: sessionOf(page),
      };
    }
    await page.locator(`.session[data-session-id="${ids[0]}"] .session-open`).click();
    await page.locator("#chat-title", { hasText: names[0] }).waitFor();
    await shot(page, "three-sessions");
    // Delete the current one: two clicks (the first arms the button).
    const del = page.locator(`.session[data-session-id="${ids[0]}"] .session-delete`);
    await del.click();
    const armedText = await del.textContent();
    await del.click();
    await page.locator(`.session[data-session-id="${ids[0]}"]`).waitFor({ state: "detached" });
    await shot(page, "after-delete");
    return {
      names,
      ids,
      titlesBefore,
      titlesAfter: await titles(),
      shown,
      armedText,
      hashAfterDelete: new URL(page.url()).hash,
      emptyVisible: await page.locator("#empty").isVisible(),
    };
  },

  async tools(context) {
    const page = await context.newPage();
    watch(page);
    // A scripted stream for the parts the fake LLM cannot produce (tool calls), and
    // model text that tries to inject markup.
    const frames = [
      { type: "start", messageId: "m-synthetic" },
      { type: "start-step" },
      { type: "reasoning-start", id: "r1" },
      { type: "reasoning-delta", id: "r1", delta: "The user wants the **weather**." },
      { type: "reasoning-end", id: "r1" },
      { type: "tool-input-start", toolCallId: "c1", toolName: "get_weather" },
      { type: "tool-input-delta", toolCallId: "c1", inputTextDelta: '{"city":' },
      { type: "tool-input-delta", toolCallId: "c1", inputTextDelta: '"Paris"}' },
      { type: "tool-input-available", toolCallId: "c1", toolName: "get_weather", input: { city: "Paris" } },
      { type: "tool-output-available", toolCallId: "c1", output: { temp_c: 21, sky: "clear" } },
      { type: "tool-input-start", toolCallId: "c2", toolName: "search" },
      { type: "tool-input-available", toolCallId: "c2", toolName: "search", input: { q: "x" } },
      { type: "tool-output-error", toolCallId: "c2", errorText: "search backend unavailable" },
      { type: "finish-step" },
      { type: "start-step" },
      { type: "text-start", id: "t1" },
      {
        type: "text-delta",
        id: "t1",
        delta:
          "It is **21 °C** and *clear* in Paris.\n\n- one `inline`\n- two\n\n```python\nprint('<b>hi</b>')\n```\n\n" +
          '[docs](https://example.com/docs) [bad](javascript:alert(1)) <img src=x onerror="window.__xss=1"><script>window.__xss=2</script>',
      },
      { type: "text-end", id: "t1" },
      { type: "data-usage-note", data: { ignored: true } },
      { type: "finish-step" },
      { type: "finish" },
    ];
    let n = 0;
    const body = frames.map((f) => `id: synthetic:${++n}\ndata: ${JSON.stringify(f)}\n\n`).join("") + ": ping\n\ndata: [DONE]\n\n";
    await page.route("**/api/chat/sessions/*/stream", (route) => {
      if (route.request().method() !== "POST") return route.continue();
      return route.fulfill({
        status: 200,
        headers: { "content-type": "text/event-stream", "x-vercel-ai-ui-message-stream": "v1", "x-turn-id": "synthetic" },
        body,
      });
    });
    await page.goto(baseUrl);
    await sendMessage(page, "weather?");
    await waitStatus(page, "completed");
    const msg = lastAssistant(page);
    const closedByDefault = await msg.locator("details.card").evaluateAll((ds) => ds.every((d) => !d.open));
    for (const summary of await msg.locator("details.card summary").all()) await summary.click();
    await shot(page, "tool-cards");
    const cards = await msg.locator("details.tool").evaluateAll((ds) =>
      ds.map((d) => ({
        name: d.querySelector(".tool-name").textContent,
        state: d.dataset.state,
        open: d.open,
        body: d.querySelector(".card-body").innerText,
      }))
    );
    const md = await msg.locator(".body > .text").evaluate((e) => ({
      strong: [...e.querySelectorAll("strong")].map((x) => x.textContent),
      em: [...e.querySelectorAll("em")].map((x) => x.textContent),
      items: [...e.querySelectorAll("ul > li")].map((x) => x.textContent),
      code: e.querySelector("pre code")?.textContent ?? null,
      inlineCode: e.querySelector("li code")?.textContent ?? null,
      links: [...e.querySelectorAll("a")].map((a) => ({ href: a.getAttribute("href"), rel: a.rel, text: a.textContent })),
      imgs: e.querySelectorAll("img").length,
      scripts: e.querySelectorAll("script").length,
      text: e.textContent,
    }));
    const reasoning = await msg.locator("details.reasoning").evaluate((d) => ({
      summary: d.querySelector("summary").textContent,
      body: d.querySelector(".card-body").textContent,
    }));
    const xss = await page.evaluate(() => window.__xss ?? null);

    // Reasoning from the real model path too: the fake LLM streams reasoning_content.
    await page.unroute("**/api/chat/sessions/*/stream");
    await sendMessage(page, "think first fake:reasoning=5 fake:tokens=5 fake:delay_ms=10");
    await waitStatus(page, "completed");
    const realReasoning = await lastAssistant(page).locator("details.reasoning .card-body").textContent();
    return { closedByDefault, cards, md, reasoning, xss, realReasoning, realText: await liveText(page) };
  },

  /**
   * Tool approval with the real model path: the fake LLM calls `save_note`, which
   * asks. Approve in the card; then Deny after a reload; then Stop, in a new tab
   * (no saved snapshot there: the card comes from the stored message).
   */
  async approval(context) {
    const page = await context.newPage();
    const requests = watch(page);
    await page.goto(baseUrl);
    const ask = (note) => `${note} fake:tool=save_note:${JSON.stringify({ text: note })}`;
    const card = (p) => lastAssistant(p).locator("details.tool");
    const asking = (p) => card(p).locator(".approval");
    const cardState = async (p) => {
      const c = card(p);
      return {
        name: await c.locator(".tool-name").textContent(),
        state: await c.getAttribute("data-state"),
        stateText: await c.locator(".tool-state").textContent(),
        open: await c.evaluate((d) => d.open),
        body: await c.locator(".card-body").innerText(),
        asking: await asking(p).isVisible(),
        buttons: await asking(p).locator("button").allTextContents(),
        badge: (await lastAssistant(p).locator(".badge").allTextContents()).join(""),
        text: await liveText(p),
      };
    };

    // 1. Approve.
    await sendMessage(page, ask("buy milk"));
    await asking(page).waitFor({ state: "visible" });
    await waitStatus(page, "awaiting_approval");
    const waiting = {
      ...(await cardState(page)),
      stopVisible: await page.locator("#stop").isVisible(),
      turnId: await lastAssistant(page).getAttribute("data-turn-id"),
    };
    await shot(page, "approval-card");
    const beforeApprove = requests.length;
    await asking(page).locator("button.approve").click();
    await waitStatus(page, "completed");
    const approved = {
      ...(await cardState(page)),
      resumed: requests.slice(beforeApprove),
      sendVisible: await page.locator("#send").isVisible(),
    };
    await shot(page, "approved");

    // 2. Reload while waiting, then Deny.
    await sendMessage(page, ask("sell milk"));
    await asking(page).waitFor({ state: "visible" });
    await waitStatus(page, "awaiting_approval");
    const marker = requests.length;
    await page.reload();
    await page.locator(".msg.assistant").nth(1).waitFor();
    await asking(page).waitFor({ state: "visible" });
    await waitStatus(page, "awaiting_approval");
    const reloaded = {
      ...(await cardState(page)),
      turnId: await lastAssistant(page).getAttribute("data-turn-id"),
      requests: requests.slice(marker),
    };
    await shot(page, "approval-card-after-reload");
    await asking(page).locator("button.deny").click();
    await waitStatus(page, "completed");
    const denied = await cardState(page);
    await shot(page, "denied");

    // 3. A new tab while a third turn waits: the stored message draws the card; Stop ends it.
    const sid = sessionOf(page);
    await sendMessage(page, ask("keep milk"));
    await asking(page).waitFor({ state: "visible" });
    await page.close();
    const tab = await context.newPage();
    const tabRequests = watch(tab);
    await tab.goto(`${baseUrl}/#/s/${sid}`);
    await tab.locator(".msg.assistant").nth(2).waitFor();
    await asking(tab).waitFor({ state: "visible" });
    await waitStatus(tab, "awaiting_approval");
    const newTab = {
      ...(await cardState(tab)),
      requests: [...tabRequests],
      assistantMessages: await tab.locator(".msg.assistant").count(),
    };
    await tab.locator("#stop").click();
    await waitStatus(tab, "cancelled");
    const stopped = { ...(await cardState(tab)), sendVisible: await tab.locator("#send").isVisible() };
    await shot(tab, "stopped-while-waiting");

    // 4. Answered elsewhere (here, another client of the API): the page notices and reads on.
    await sendMessage(tab, ask("milk elsewhere"));
    await asking(tab).waitFor({ state: "visible" });
    await waitStatus(tab, "awaiting_approval");
    const turnId = await lastAssistant(tab).getAttribute("data-turn-id");
    const turnUrl = `${baseUrl}/api/chat/sessions/${sid}/turns/${turnId}`;
    const [pending] = (await (await fetch(turnUrl)).json()).approvals;
    const answer = await fetch(`${turnUrl}/approvals`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ decisions: [{ approval_id: pending.approval_id, approved: true }] }),
    });
    await waitStatus(tab, "completed", 15000);
    const elsewhere = { answerStatus: answer.status, ...(await cardState(tab)) };
    return { sessionId: sid, waiting, approved, reloaded, denied, newTab, stopped, elsewhere };
  },

  async auth(context) {
    const page = await context.newPage();
    watch(page);
    await page.goto(baseUrl);
    await page.locator("#auth").waitFor({ state: "visible" });
    const firstReason = await page.locator("#auth-reason").textContent();
    await shot(page, "token-prompt");
    await page.locator("#auth-token").fill("wrong-token");
    await page.locator("#auth-token").press("Enter");
    await page.locator("#auth-reason", { hasText: "not accepted" }).waitFor();
    const wrongReason = await page.locator("#auth-reason").textContent();
    await page.locator("#auth-token").fill(config.token);
    await page.locator("#auth-token").press("Enter");
    await page.locator("#auth").waitFor({ state: "hidden" });
    await sendMessage(page, "with a token fake:tokens=10 fake:delay_ms=10");
    await waitStatus(page, "completed");
    const text = await liveText(page);
    await shot(page, "authorised");
    const stored = await page.evaluate(() => localStorage.getItem("turnrelay.token"));
    await page.reload();
    await page.locator(".msg.assistant").first().waitFor();
    return {
      firstReason,
      wrongReason,
      text,
      expected: tokens(10),
      stored,
      promptAfterReload: await page.locator("#auth").isVisible(),
      textAfterReload: await liveText(page),
      sessionId: sessionOf(page),
    };
  },
};

// -- main -------------------------------------------------------------------------------

async function main() {
  mkdirSync(outDir, { recursive: true });
  const run = scenarios[scenario];
  if (!run) throw new Error(`unknown scenario ${scenario}; known: ${Object.keys(scenarios).join(", ")}`);
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  // A fresh context is a fresh profile: no cookies, no storage from another run.
  const context = await browser.newContext({ viewport: { width: 1100, height: 720 } });
  context.setDefaultTimeout(15000);
  try {
    const result = await run(context);
    return { ok: true, result };
  } catch (err) {
    const pages = context.pages();
    if (pages.length) await shot(pages[pages.length - 1], "failure").catch(() => {});
    return { ok: false, error: String(err?.stack || err) };
  } finally {
    await browser.close();
  }
}

const outcome = await main().catch((err) => ({ ok: false, error: String(err?.stack || err) }));
process.stdout.write(JSON.stringify({ scenario, ...outcome, screenshots, pageErrors }) + "\n");
process.exit(0);
