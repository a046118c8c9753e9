// Tool approval through the AI SDK's own `Chat` engine (`AbstractChat`, what `useChat`
// wraps) against real turnrelay: the chat receives the `tool-approval-request`, the
// user answers with `addToolApprovalResponse`, and `sendAutomaticallyWhen:
// lastAssistantMessageIsCompleteWithApprovalResponses` sends the answer back, as an app
// using `useChat` does. Then the same with a denial.
//
//   node approval_chat.mjs '{"api": "<server>/api/chat/sessions/<id>/stream", "chatId": "<id>",
//                            "approve": "<message>", "deny": "<message>"}'
//
// stdout: one JSON object, {steps: {...}, errors: [...]}. Exit 1 on any chat error.

import { DefaultChatTransport, lastAssistantMessageIsCompleteWithApprovalResponses } from 'ai';
import { Chat } from './chat.mjs';

const config = JSON.parse(process.argv[2]);


const errors = [];
const requests = [];
const chat = new Chat({
  id: config.chatId,
  transport: new DefaultChatTransport({
    api: config.api,
    fetch: async (url, init) => {
      requests.push(JSON.parse(init.body));
      return fetch(url, init);
    },
  }),
  sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithApprovalResponses,
  onError: (error) => errors.push(String(error?.message ?? error)),
});

function toolPart(message) {
  return message?.parts.find((p) => p.type === 'tool-save_note');
}

function view() {
  return {
    status: chat.status,
    messages: chat.messages.map((m) => ({
      id: m.id,
      role: m.role,
      text: m.parts.filter((p) => p.type === 'text').map((p) => p.text).join(''),
      tool: toolPart(m) ? {
        state: toolPart(m).state,
        approval: toolPart(m).approval ?? null,
        output: toolPart(m).output ?? null,
        input: toolPart(m).input ?? null,
      } : null,
      metadata: m.metadata ?? null,
    })),
  };
}

async function until(predicate, what, timeoutMs = 20000) {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(view())}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const steps = {};
for (const [name, approved] of [['approve', true], ['deny', false]]) {
  await chat.sendMessage({ text: config[name] });
  await until(() => chat.status === 'ready' && toolPart(chat.lastMessage)?.state === 'approval-requested',
    `the ${name} request`);
  steps[`${name}Asked`] = view();
  const before = requests.length;
  await chat.addToolApprovalResponse({
    id: toolPart(chat.lastMessage).approval.id,
    approved,
    ...(approved ? {} : { reason: 'not now' }),
  });
  const done = approved ? 'output-available' : 'output-denied';
  await until(() => chat.status === 'ready' && toolPart(chat.lastMessage)?.state === done &&
    chat.lastMessage.metadata?.status === 'completed', `the ${name} answer to go through`);
  steps[`${name}Done`] = view();
  steps[`${name}Request`] = requests.slice(before);
}

process.stdout.write(JSON.stringify({ steps, errors }) + '\n');
if (errors.length) process.exitCode = 1;
