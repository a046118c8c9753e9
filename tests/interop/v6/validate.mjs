// AI SDK 6's own chunk schema and stream reader over chunks given on the command line:
//
//   node validate.mjs '<json array of chunks>'
//
// stdout: {schemaErrors, sdkErrors, message}. Exit 1 on a schema error.

import { readUIMessageStream, uiMessageChunkSchema } from 'ai';

const chunks = JSON.parse(process.argv[2]);
const schema = typeof uiMessageChunkSchema === 'function' ? uiMessageChunkSchema() : uiMessageChunkSchema;
const schemaErrors = [];
for (const [index, chunk] of chunks.entries()) {
  const checked = await schema.validate(chunk);
  if (!checked.success) schemaErrors.push({ index, chunk, error: String(checked.error?.message ?? checked.error).slice(0, 500) });
}
const sdkErrors = [];
let message = null;
for await (const m of readUIMessageStream({
  stream: new ReadableStream({
    start(controller) {
      for (const chunk of chunks) controller.enqueue(chunk);
      controller.close();
    },
  }),
  onError: (error) => sdkErrors.push(String(error?.message ?? error)),
})) {
  message = m;
}
process.stdout.write(JSON.stringify({ schemaErrors, sdkErrors, message }) + '\n');
if (schemaErrors.length) process.exitCode = 1;
