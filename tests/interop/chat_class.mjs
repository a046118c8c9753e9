// Drives turnrelay with the AI SDK's own `Chat` engine (`AbstractChat`, what `useChat`
// wraps), through turnrelay's endpoints, and prints what the chat held after each step.
//
//   node chat_class.mjs '<json config>'
//
// config: {
//   api: "<server>/api/chat/sessions/<id>/stream",   // the transport's `api` (POST) and,
//                                                     // for resumeStream, the GET
//   cancelUrl: "<server>/api/chat/sessions/<id>/cancel",
//   chatId, first, long, resumeText,                 // the messages of the steps below
// }
//
// Steps, one Chat per "page": send → regenerate → send + stop (with turnrelay's cancel,
// what a Stop button wires up) → a new Chat (a reload) that resumes a running turn with
// `resumeStream()`, as `useChat({ resume: true })` does on mount.
//
// stdout: one JSON object, {steps: {...}, errors: [...]}. Exit 1 on any chat error.

import { DefaultChatTransport } from 'ai';
import { Chat } from './chat.mjs';

const config = JSON.parse(process.argv[2]);


const errors = [];
const finishes = [];

function newChat(messages = []) {
  return new Chat({
    id: config.chatId,
    messages,
    transport: new DefaultChatTransport({
      api: config.api,
      prepareReconnectToStreamRequest: () => ({ api: config.api }),
    }),
    onError: (error) => errors.push(String(error?.message ?? error)),
    onFinish: ({ message, isAbort, isError, isDisconnect, finishReason }) =>
      finishes.push({ id: message.id, isAbort, isError, isDisconnect, finishReason, metadata: message.metadata ?? null }),
  });
}

function view(chat) {
  return {
    status: chat.status,
    messages: chat.messages.map((m) => ({
      id: m.id,
      role: m.role,
      text: m.parts.filter((p) => p.type === 'text').map((p) => p.text).join(''),
      metadata: m.metadata ?? null,
    })),
    finish: finishes.at(-1) ?? null,
  };
}

async function until(predicate, what, timeoutMs = 20000) {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const steps = {};
const chat = newChat();

await chat.sendMessage({ text: config.first });
steps.send = view(chat);

await chat.regenerate();
steps.regenerate = view(chat);

const sent = chat.sendMessage({ text: config.long });
await until(() => (chat.lastMessage?.role === 'assistant' &&
  chat.lastMessage.parts.some((p) => p.type === 'text' && p.text.split(' ').length >= 5)), 'the long reply to stream');
const cancel = await fetch(config.cancelUrl, { method: 'POST' });
steps.cancelAnswer = await cancel.json();
await sent;
await chat.stop();
steps.stop = view(chat);

// A reload while a turn runs: the page knows the user message (stored), not the reply.
const running = newChat();
const pending = running.sendMessage({ text: config.resumeText });
await until(() => running.lastMessage?.role === 'assistant', 'the resumed turn to start');
await running.stop(); // the tab goes away; the turn keeps running on the server
const userMessage = running.messages.find((m) => m.role === 'user');
await pending;
const reloaded = newChat([userMessage]);
await reloaded.resumeStream();
steps.resume = view(reloaded);
steps.resumeCutAt = view(running).messages.at(-1)?.text ?? '';

process.stdout.write(JSON.stringify({ steps, errors }) + '\n');
if (errors.length) process.exitCode = 1;
