// A small, safe Markdown renderer for model text.
//
// It builds DOM nodes and puts all model text in through `textContent`, so no
// model-written markup can ever reach the page as HTML. It covers what chat
// replies use: paragraphs, headings, fenced code blocks, inline code, bold and
// italic, bullet and numbered lists, block quotes and links (http, https and
// mailto only; opened with rel="noopener noreferrer"). A fence that is still
// open while a reply streams renders as code up to the end of the text.

const FENCE = /^\s*(```|~~~)\s*([\w+#.-]*)\s*$/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*(\d{1,9})[.)]\s+(.*)$/;
const QUOTE = /^\s*>\s?(.*)$/;
const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;
const SAFE_URL = /^(https?:\/\/|mailto:)/i;

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

/** Render `text` into a DocumentFragment. */
export function renderMarkdown(text) {
  const root = document.createDocumentFragment();
  const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  let paragraph = [];

  const flushParagraph = () => {
    if (paragraph.length) {
      const p = el("p");
      appendInline(p, paragraph.join("\n"));
      root.append(p);
      paragraph = [];
    }
  };

  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(FENCE);
    if (fence) {
      flushParagraph();
      const body = [];
      i += 1;
      while (i < lines.length && lines[i].trim() !== fence[1]) {
        body.push(lines[i]);
        i += 1;
      }
      i += 1; // the closing fence (or past the end while it streams)
      const pre = el("pre");
      const code = el("code");
      if (fence[2]) code.dataset.lang = fence[2];
      code.textContent = body.join("\n");
      pre.append(code);
      root.append(pre);
      continue;
    }
    if (!line.trim()) {
      flushParagraph();
      i += 1;
      continue;
    }
    const heading = line.match(HEADING);
    if (heading) {
      flushParagraph();
      const h = el(`h${Math.min(heading[1].length + 2, 6)}`);
      appendInline(h, heading[2]);
      root.append(h);
      i += 1;
      continue;
    }
    if (RULE.test(line)) {
      flushParagraph();
      root.append(el("hr"));
      i += 1;
      continue;
    }
    if (BULLET.test(line) || NUMBERED.test(line)) {
      flushParagraph();
      const ordered = !BULLET.test(line);
      const pattern = ordered ? NUMBERED : BULLET;
      const list = el(ordered ? "ol" : "ul");
      if (ordered) {
        const first = Number(line.match(NUMBERED)[1]);
        if (first !== 1) list.start = first;
      }
      let item = null;
      while (i < lines.length && lines[i].trim()) {
        const m = lines[i].match(pattern);
        if (m) {
          item = el("li");
          appendInline(item, ordered ? m[2] : m[1]);
          list.append(item);
        } else if (item && /^\s+/.test(lines[i])) {
          item.append(document.createTextNode(" "));
          appendInline(item, lines[i].trim());
        } else {
          break;
        }
        i += 1;
      }
      root.append(list);
      continue;
    }
    if (QUOTE.test(line)) {
      flushParagraph();
      const quoted = [];
      while (i < lines.length && QUOTE.test(lines[i])) {
        quoted.push(lines[i].match(QUOTE)[1]);
        i += 1;
      }
      const bq = el("blockquote");
      bq.append(renderMarkdown(quoted.join("\n")));
      root.append(bq);
      continue;
    }
    paragraph.push(line);
    i += 1;
  }
  flushParagraph();
  return root;
}

// Inline syntax, first match wins: code spans first so nothing inside them is
// formatted, then links, then bold before italic.
const INLINE = [
  { re: /`([^`\n]+)`/, make: (m) => textEl("code", m[1]) },
  {
    re: /\[([^\]\n]+)\]\(([^)\s]+)\)/,
    make: (m) => {
      if (!SAFE_URL.test(m[2])) return document.createTextNode(m[0]);
      const a = el("a");
      a.href = m[2];
      a.target = "_blank";
      a.rel = "noopener noreferrer";
      appendInline(a, m[1]);
      return a;
    },
  },
  { re: /\*\*(?=\S)([^*]+?)\*\*|(?<![\w])__(?=\S)([^_]+?)__(?![\w])/, make: (m) => nested("strong", m[1] ?? m[2]) },
  { re: /\*(?=\S)([^*\n]+?)\*|(?<![\w])_(?=\S)([^_\n]+?)_(?![\w])/, make: (m) => nested("em", m[1] ?? m[2]) },
  {
    re: /\bhttps?:\/\/[^\s<>()]+[^\s<>().,;:!?'"]/,
    make: (m) => {
      const a = el("a");
      a.href = m[0];
      a.target = "_blank";
      a.rel = "noopener noreferrer";
      a.textContent = m[0];
      return a;
    },
  },
];

function textEl(tag, text) {
  const node = el(tag);
  node.textContent = text;
  return node;
}

function nested(tag, text) {
  const node = el(tag);
  appendInline(node, text);
  return node;
}

function appendInline(parent, text) {
  let rest = text;
  while (rest) {
    let best = null;
    let bestRule = null;
    for (const rule of INLINE) {
      const m = rest.match(rule.re);
      if (m && (best === null || m.index < best.index)) {
        best = m;
        bestRule = rule;
      }
    }
    if (!best) {
      appendText(parent, rest);
      return;
    }
    if (best.index > 0) appendText(parent, rest.slice(0, best.index));
    parent.append(bestRule.make(best));
    rest = rest.slice(best.index + best[0].length);
  }
}

// Single newlines inside a paragraph are kept as line breaks: chat replies use
// them that way far more often than Markdown's soft wrap.
function appendText(parent, text) {
  const pieces = text.split("\n");
  pieces.forEach((piece, k) => {
    if (k > 0) parent.append(el("br"));
    if (piece) parent.append(document.createTextNode(piece));
  });
}
