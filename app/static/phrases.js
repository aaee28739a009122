// A ranked list of phrases with score bars, as POST /annotate returns them.

import { el, formatScore } from "./dom.js";
import { showError } from "./messages.js";

/**
 * Renders items [{phrase_id, phrase, score, artworks: [{id, external_id, title}]}] into
 * container. onAccept(item) -> Promise, when given, adds an "Accept" button per phrase.
 */
export function renderPhrases(container, items, { onAccept } = {}) {
  if (!items.length) {
    container.replaceChildren(el("p", { class: "empty" }, "No phrase matched this region."));
    return;
  }
  // A bar shows the score itself (a cosine-based similarity, at most 1), not the score
  // relative to the first phrase: a long bar is a confident match, and bars of one length
  // say the model cannot tell those phrases apart.
  const list = el("ol", { class: "phrases", "aria-label": "Ranked phrases" });
  for (const item of items) {
    const fraction = Math.min(Math.max(item.score, 0), 1);
    const bar = el("span", { class: "bar-fill" });
    bar.style.width = `${(fraction * 100).toFixed(1)}%`;
    const describes = item.artworks?.length
      ? el(
          "p",
          { class: "phrase-artworks" },
          "Describes ",
          ...item.artworks.flatMap((artwork, index) => [
            index ? ", " : "",
            el("a", { href: `#/artworks/${artwork.id}` }, artwork.title || artwork.external_id),
          ]),
        )
      : null;
    const accept = onAccept
      ? el("button", {
          type: "button",
          class: "accept",
          "aria-label": `Accept “${item.phrase}” as an annotation of this box`,
          onclick: (event) => acceptPhrase(event.currentTarget, item, onAccept),
        }, "Accept")
      : null;
    list.append(
      el(
        "li",
        { class: "phrase" },
        el(
          "div",
          { class: "phrase-head" },
          el("span", { class: "phrase-text" }, item.phrase),
          el("span", { class: "score", title: "similarity score" }, formatScore(item.score)),
        ),
        el("div", { class: "bar", "aria-hidden": "true" }, bar),
        el("div", { class: "phrase-foot" }, describes, accept),
      ),
    );
  }
  container.replaceChildren(list);
}

async function acceptPhrase(button, item, onAccept) {
  button.disabled = true;
  button.textContent = "Saving…";
  try {
    await onAccept(item);
    button.textContent = "Saved ✓";
    button.classList.add("saved");
  } catch (error) {
    button.disabled = false;
    button.textContent = "Accept";
    showError(error);
  }
}

/** A "working…" placeholder while a request is out. */
export function renderPending(container, text) {
  container.replaceChildren(el("p", { class: "pending" }, el("span", { class: "spinner", "aria-hidden": "true" }), text));
}
