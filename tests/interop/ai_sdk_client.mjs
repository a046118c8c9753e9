// Reads one turnrelay turn with the AI SDK's own client code and prints what it assembled.
//
//   node ai_sdk_client.mjs '<json config>'
//
// config: {
//   mode: "send" | "reconnect" | "validate",
//   api: "<server>/api/chat/sessions/<id>/stream",    // DefaultChatTransport `api`
//   chatId, userMessageId, text,                       // send: the UIMessage useChat would send
//   trigger, messageId, history,                       // send: as Chat.regenerate() sends them
//   sessionUrl: "<server>/api/chat/sessions/<id>",     // reconnect: read active_turn at connect
//   chunks: [...],                                     // validate: chunks to check, no server
//   expectErrors: 0 | N,                               // how many SDK errors the turn should raise
//   handshake: true,                                   // print "ready" to stderr, wait for stdin
// }
//
// "send" calls `transport.sendMessages(...)` exactly as `useChat` does; "reconnect" calls
// `transport.reconnectToStream({ chatId })` with `prepareReconnectToStreamRequest` pointed at
// turnrelay's `GET /sessions/<id>/stream`. Either way the chunk stream is fed to
// `readUIMessageStream`, and the bytes on the wire are kept (through the transport's `fetch`
// option) so every frame is checked against the SDK's exported `uiMessageChunkSchema` and,
// because that schema is loose, against the keys the SDK declares for the chunk type (the
// strict check older AI SDK clients apply with `z.strictObject`).
//
// stdout: one JSON object. Exit status 1 when anything went wrong that the config did not
// expect: a schema rejection, an undeclared key, an SDK error, a thrown error.

import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';

import {
  DefaultChatTransport,
  readUIMessageStream,
  uiMessageChunkSchema,
} from 'ai';

const require = createRequire(import.meta.url);
const config = JSON.parse(process.argv[2]);

// ---- the SDK's declared chunk keys, from the schema source the package ships ----

function declaredChunkKeys() {
  const root = dirname(require.resolve('ai/package.json'));
  const path = join(root, 'src', 'ui-message-stream', 'ui-message-chunks.ts');
  const source = readFileSync(path, 'utf8');
  const start = source.indexOf('uiMessageChunkSchema');
  const end = source.indexOf('export type', start);
  const lines = source.slice(start, end).split('\n');
  const objectStart = /^(\s*)z\.(looseObject|strictObject|object)\(\{\s*$/;
  // The union's members are the object literals with the least indentation.
  const indents = lines.map(l => l.match(objectStart)).filter(Boolean).map(m => m[1].length);
  const top = Math.min(...indents);
  const keys = new Map();
  let current = null;
  for (const line of lines) {
    const m = line.match(objectStart);
    if (m && m[1].length === top) {
      current = { type: null, keys: new Set() };
      continue;
    }
    if (!current) continue;
    const key = line.match(/^(\s*)(\w+):\s*(.*)$/);
    if (key && key[1].length === top + 2) {
      current.keys.add(key[2]);
      if (key[2] === 'type') {
        const literal = key[3].match(/z\.literal\(['"]([^'"]+)['"]\)/);
        current.type = literal ? literal[1] : key[3].includes('data-') ? 'data-*' : null;
        if (current.type) keys.set(current.type, current.keys);
      }
    }
  }
  for (const needed of ['start', 'finish', 'text-delta', 'reasoning-delta', 'error', 'data-*']) {
    if (!keys.has(needed)) {
      throw new Error(`cannot read the declared keys of '${needed}' chunks from ${path}`);
    }
  }
  return keys;
}

const declared = declaredChunkKeys();
const schema = typeof uiMessageChunkSchema === 'function'
  ? uiMessageChunkSchema()
  : uiMessageChunkSchema;

// ---- the raw wire: SSE frames as the server sent them ----

function parseSse(text) {
  const events = [];
  for (const block of text.split(/\r?\n\r?\n/)) {
    const data = [];
    let id = null;
    for (const line of block.split(/\r?\n/)) {
      if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
      else if (line.startsWith('id:')) id = line.slice(3).trim();
    }
    if (data.length) events.push({ id, data: data.join('\n') });
  }
  return events;
}

const wire = { url: null, status: null, headers: {}, text: '' };

async function recordingFetch(input, init) {
  const response = await fetch(input, init);
  wire.url = String(input);
  wire.status = response.status;
  wire.headers = Object.fromEntries(response.headers.entries());
  if (!response.body) return response;
  const [mine, theirs] = response.body.tee();
  const decoder = new TextDecoder();
  wire.done = (async () => {
    for await (const bytes of mine) wire.text += decoder.decode(bytes, { stream: true });
    wire.text += decoder.decode();
  })();
  return new Response(theirs, {
    status: response.status,
    statusText: response.statusText,
    headers: response.headers,
  });
}

// ---- one turn through the SDK ----

function short(value, limit = 600) {
  const text = String(value);
  return text.length > limit ? `${text.slice(0, limit)}…` : text;
}

function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what} timed out after ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

async function checkChunk(result, index, chunk) {
  const checked = await schema.validate(chunk);
  if (!checked.success) {
    result.schemaErrors.push({ index, chunk, error: short(checked.error?.message ?? checked.error) });
  }
  const type = String(chunk?.type);
  const keys = declared.get(type.startsWith('data-') ? 'data-*' : type);
  const extra = keys ? Object.keys(chunk).filter(k => !keys.has(k)) : [];
  if (extra.length) result.undeclaredKeys.push({ index, chunk, keys: extra });
}

async function assemble(result, chunkStream) {
  const [forMessage, forChunks] = chunkStream.tee();
  const collecting = (async () => {
    for await (const chunk of forChunks) result.chunks.push(chunk);
  })();
  let last = null;
  try {
    for await (const message of readUIMessageStream({
      stream: forMessage,
      onError: error => result.sdkErrors.push(short(error?.message ?? error)),
    })) {
      last = message;
      result.snapshots += 1;
    }
    await collecting;
  } catch (error) {
    result.thrown = short(error?.stack ?? error);
  }
  result.message = last;
}

async function run() {
  const result = {
    mode: config.mode,
    sdkErrors: [],
    chunks: [],
    wireFrames: [],
    schemaErrors: [],
    undeclaredKeys: [],
    message: null,
    snapshots: 0,
    activeTurnAtConnect: null,
    noStream: false,
  };
  const transport = new DefaultChatTransport({
    api: config.api,
    fetch: recordingFetch,
    // The default reconnect URL is `${api}/${chatId}/stream`; turnrelay resumes at
    // `GET /api/chat/sessions/<id>/stream`, the same path the POST uses.
    prepareReconnectToStreamRequest: () => ({ api: config.reconnectApi ?? config.api }),
  });

  let chunkStream;
  if (config.mode === 'send') {
    chunkStream = await transport.sendMessages({
      chatId: config.chatId,
      messages: [
        ...(config.history ?? []),
        { id: config.userMessageId, role: 'user', parts: [{ type: 'text', text: config.text }] },
      ],
      // `Chat.regenerate()` sends 'regenerate-message' with the messages up to the
      // user message it answers again, and the assistant id it replaces (or none).
      trigger: config.trigger ?? 'submit-message',
      messageId: config.messageId,
      abortSignal: undefined,
    });
  } else if (config.mode === 'reconnect') {
    chunkStream = await transport.reconnectToStream({ chatId: config.chatId });
    if (config.sessionUrl) {
      const session = await (await fetch(config.sessionUrl)).json();
      result.activeTurnAtConnect = session.active_turn;
    }
    if (chunkStream === null) {
      result.noStream = true;
      return result;
    }
  } else if (config.mode === 'validate') {
    // Chunks given in the config (turnrelay's builders), no server: schema, keys, assembly.
    for (const [index, chunk] of config.chunks.entries()) await checkChunk(result, index, chunk);
    await assemble(result, new ReadableStream({
      start(controller) {
        for (const chunk of config.chunks) controller.enqueue(chunk);
        controller.close();
      },
    }));
    return result;
  } else {
    throw new Error(`unknown mode ${config.mode}`);
  }

  await assemble(result, chunkStream);
  await wire.done;
  result.wire = { url: wire.url, status: wire.status, headers: wire.headers };

  for (const [index, frame] of parseSse(wire.text).entries()) {
    result.wireFrames.push(frame);
    if (frame.data === '[DONE]') continue;
    let chunk;
    try {
      chunk = JSON.parse(frame.data);
    } catch (error) {
      result.schemaErrors.push({ index, data: frame.data, error: `not JSON: ${error}` });
      continue;
    }
    await checkChunk(result, index, chunk);
  }
  return result;
}

// With `handshake`, say so on stderr once the SDK is loaded and wait for a line on stdin:
// the caller can then time the request precisely (e.g. reconnect while a turn runs).
if (config.handshake) {
  process.stderr.write('ready\n');
  await new Promise(resolve => process.stdin.once('data', resolve));
  process.stdin.pause();
}

let result;
let failure = null;
try {
  result = await withTimeout(run(), config.timeoutMs ?? 30000, `${config.mode} turn`);
} catch (error) {
  failure = error;
  result = { mode: config.mode, thrown: short(error?.stack ?? error) };
}
const problems = [];
if (failure) problems.push(`thrown: ${short(failure.message ?? failure)}`);
else if (result.thrown) problems.push(`the chunk stream threw: ${result.thrown}`);
if (result.schemaErrors?.length) problems.push(`${result.schemaErrors.length} chunk(s) fail uiMessageChunkSchema`);
if (result.undeclaredKeys?.length) problems.push(`${result.undeclaredKeys.length} chunk(s) carry keys the SDK does not declare`);
if (result.sdkErrors && result.sdkErrors.length !== (config.expectErrors ?? 0)) {
  problems.push(`SDK reported ${result.sdkErrors.length} error(s), expected ${config.expectErrors ?? 0}: ${JSON.stringify(result.sdkErrors)}`);
}
result.problems = problems;
process.stdout.write(JSON.stringify(result) + '\n');
if (problems.length) {
  process.stderr.write(problems.join('\n') + '\n');
  process.exitCode = 1;
}
