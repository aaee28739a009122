// Search: a phrase in, fragments out, each shown on its artwork with its box; hovering (or
// focusing, or pressing) a query word shows the regions that word attended to, with the
// attention weight as opacity. Facets narrow the search to artworks with chosen metadata;
// each box is labelled with the words the detector read in it ("gold · bird").

import { api, latestOnly, query } from "./api.js";
import { Figure, seenWords } from "./boxes.js";
import { debounce, el, formatScore } from "./dom.js";
import { Facets, filterParams, parseFilters } from "./facets.js";
import { clearError, showError } from "./messages.js";

const PAGE_SIZE = 12;
const nextSignal = latestOnly();
const $ = (id) => document.getElementById(id);

let state = { q: "", offset: 0, selected: new Map(), perArtwork: false };
let shown = []; // [{item, figure}] for every result on the page
let pinnedWord = null;
let facets = null;

export function initSearch() {
  const typed = debounce(() => {
    const q = $("search-q").value.trim();
    if (q !== state.q) start(q); // typing back to the same words asks nothing new
  }, 300);
  $("search-q").addEventListener("input", typed);
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    typed.cancel(); // Enter asks at once; the pending debounced call would only repeat it
    start($("search-q").value.trim());
  });
  $("search-more").addEventListener("click", () => load(state.offset + PAGE_SIZE));
  $("search-per-artwork").addEventListener("change", (event) => {
    start(state.q, state.selected, event.target.checked);
  });
  facets = new Facets($("search-facets"), { onChange: (selected) => start(state.q, selected) });
}

export function showSearch(params) {
  const q = params.get("q") || "";
  const selected = parseFilters(params);
  const perArtwork = params.get("per_artwork") === "true";
  if ($("search-q").value.trim() !== q) $("search-q").value = q;
  $("search-per-artwork").checked = perArtwork;
  if (q !== state.q || !shown.length || perArtwork !== state.perArtwork
      || filterParams(selected).join() !== filterParams(state.selected).join()) {
    start(q, selected, perArtwork);
  }
  $("search-q").focus();
}

/** The service's options for the current search, as query parameters (also the page's URL). */
function searchParams({ q, selected, perArtwork }) {
  return { q, filter: filterParams(selected), per_artwork: perArtwork ? "true" : undefined };
}

function start(q, selected = state.selected, perArtwork = state.perArtwork) {
  history.replaceState(null, "", `#/search${query(searchParams({ q, selected, perArtwork }))}`);
  state = { q, offset: 0, selected, perArtwork };
  facets.load(selected);
  shown = [];
  pinnedWord = null;
  $("search-results").replaceChildren();
  $("search-more").hidden = true;
  if (!q) {
    nextSignal(); // drop an answer still on its way for an older query
    $("search-summary").textContent = "";
    $("search-words").hidden = true;
    $("search-understood").hidden = true;
    return;
  }
  load(0);
}

async function load(offset) {
  clearError();
  const results = $("search-results");
  results.setAttribute("aria-busy", "true");
  $("search-summary").textContent = offset ? "Loading more…" : `Searching for “${state.q}”…`;
  try {
    const answer = await api(
      `/search${query({ ...searchParams(state), limit: PAGE_SIZE, offset })}`,
      { signal: nextSignal() },
    );
    state.offset = offset;
    const cards = answer.items.map((item, index) => card(item, offset + index + 1));
    results.append(...cards);
    if (offset === 0) {
      renderWords(answer.items);
      renderUnderstood(answer);
    }
    const count = offset + answer.items.length;
    $("search-summary").textContent = count
      ? `${count} fragment${count === 1 ? "" : "s"} for “${answer.query}”, best first.`
      : `No fragment matches “${answer.query}”.`;
    // A full page means there may be more; the service does not count all matches.
    $("search-more").hidden = answer.items.length < PAGE_SIZE;
  } catch (error) {
    if (offset > 0 && error.type?.endsWith(":page-out-of-range")) {
      // The service reranks a fixed number of candidates per query: this is the end.
      $("search-more").hidden = true;
      $("search-summary").textContent = `${state.offset + PAGE_SIZE} fragments for “${state.q}”: all the service ranks.`;
      return;
    }
    if (error.name !== "AbortError") $("search-summary").textContent = "";
    showError(error);
  } finally {
    results.setAttribute("aria-busy", "false");
  }
}

function card(item, rank) {
  const title = item.title || item.external_id;
  const figure = new Figure({
    src: item.thumbnail_url || item.image_url,
    width: item.width,
    height: item.height,
    alt: `${title}, with the matching fragment outlined`,
    loading: "lazy",
  });
  const seen = seenWords(item.attributes);
  figure.drawBox("match", item.box, { className: "match", label: seen });
  shown.push({ item, figure });
  if (pinnedWord) showAttention(figure, item, pinnedWord);
  return el(
    "li",
    { class: "result" },
    el("div", { class: "result-images" }, figure.element),
    el(
      "div",
      { class: "result-text" },
      el("img", {
        class: "crop",
        src: item.crop_url,
        alt: `The matching fragment of ${title}`,
        loading: "lazy",
        decoding: "async",
      }),
      el("span", { class: "result-title" },
        el("span", { class: "rank", "aria-hidden": "true" }, `#${rank} `),
        el("a", { href: `#/artworks/${item.artwork_id}` }, title)),
      el("span", { class: "score", title: "similarity score" }, formatScore(item.score)),
      el("span", { class: "card-meta" }, item.external_id),
      seen && el("span", { class: "seen", title: "what the detector saw in the box" }, `Detector: ${seen}`),
      item.also?.length > 0 && el("span", { class: "also" }, alsoText(item.also.length)),
    ),
  );
}

function alsoText(n) {
  const fragments = `fragment${n === 1 ? "" : "s"}`;
  return state.perArtwork ? `and ${n} more matching ${fragments} of this artwork`
    : `stands for ${n} overlapping ${fragments}`;
}

/** What the service made of the query: the phrases it searched, the words it could not use. */
function renderUnderstood(answer) {
  const parts = [];
  if (answer.phrases.length > 1) parts.push(`Searched for ${answer.phrases.map((p) => `“${p}”`).join(" and ")}.`);
  if (answer.whole_query) parts.push("No noun phrase found: the whole query was searched.");
  if (answer.unknown_words.length) {
    parts.push(`Not understood (not in the model's vocabulary): ${answer.unknown_words.join(", ")}.`);
  }
  $("search-understood").textContent = parts.join(" ");
  $("search-understood").hidden = parts.length === 0;
}

function renderWords(items) {
  const words = [...new Set(items.flatMap((item) => (item.attention || []).map((entry) => entry.word)))];
  $("search-words").hidden = words.length === 0;
  $("search-word-list").replaceChildren(
    ...words.map((word) => {
      const button = el(
        "button",
        {
          type: "button",
          class: "chip word",
          "aria-pressed": "false",
          "aria-label": `Show where “${word}” attended`,
        },
        word,
      );
      button.addEventListener("mouseenter", () => highlight(word));
      button.addEventListener("focus", () => highlight(word));
      button.addEventListener("mouseleave", () => highlight(pinnedWord));
      button.addEventListener("blur", () => highlight(pinnedWord));
      // A press keeps the word shown (touch screens have no hover).
      button.addEventListener("click", () => {
        pinnedWord = pinnedWord === word ? null : word;
        for (const other of $("search-word-list").querySelectorAll("button")) {
          other.setAttribute("aria-pressed", String(other.textContent === pinnedWord));
        }
        highlight(pinnedWord);
      });
      return el("li", {}, button);
    }),
  );
}

function highlight(word) {
  for (const { item, figure } of shown) showAttention(figure, item, word);
}

function showAttention(figure, item, word) {
  figure.clear("attention");
  figure.element.classList.toggle("attending", Boolean(word));
  if (!word) return;
  const entry = (item.attention || []).find((candidate) => candidate.word === word);
  if (!entry) return;
  // Opacity relative to this word's strongest region, so a spread-out word still shows.
  const strongest = Math.max(...entry.regions.map((region) => region.weight), Number.EPSILON);
  for (const region of entry.regions) {
    figure.drawBox("attention", region.box, {
      className: "attention",
      opacity: (0.85 * region.weight) / strongest,
    });
  }
}
