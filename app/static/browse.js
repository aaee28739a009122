// Browse: the collection as a grid of thumbnails, paged, with a filter box and facets.

import { api, latestOnly, query } from "./api.js";
import { debounce, el } from "./dom.js";
import { Facets, filterParams, parseFilters } from "./facets.js";
import { showError } from "./messages.js";

const PAGE_SIZE = 24;
const nextSignal = latestOnly();
const $ = (id) => document.getElementById(id);

let state = { q: "", page: 1, total: 0, selected: new Map() };
let facets = null;

export function initBrowse({ navigate }) {
  const filter = debounce((q) => {
    // replaceState: typing must not fill the history, and must not re-route.
    state = { ...state, q, page: 1 };
    history.replaceState(null, "", pageHash(1));
    load();
  }, 300);
  facets = new Facets($("browse-facets"), { onChange: (selected) => {
    state = { ...state, selected, page: 1 };
    history.replaceState(null, "", pageHash(1));
    load();
  } });
  $("browse-q").addEventListener("input", (event) => filter(event.target.value.trim()));
  $("browse-prev").addEventListener("click", () => navigate(pageHash(state.page - 1)));
  $("browse-next").addEventListener("click", () => navigate(pageHash(state.page + 1)));
}

function pageHash(page) {
  return `#/browse${query({ q: state.q, filter: filterParams(state.selected), page: page > 1 ? page : "" })}`;
}

/** Called by the router with the hash's parameters. */
export function showBrowse(params) {
  const q = params.get("q") || "";
  const page = Math.max(1, Number.parseInt(params.get("page") || "1", 10) || 1);
  if ($("browse-q").value.trim() !== q) $("browse-q").value = q;
  state = { ...state, q, page, selected: parseFilters(params) };
  load();
}

async function load() {
  const grid = $("browse-grid");
  grid.setAttribute("aria-busy", "true");
  const { q, page, selected } = state;
  facets.load(selected, { q });
  try {
    const answer = await api(
      `/artworks${query({ limit: PAGE_SIZE, offset: (page - 1) * PAGE_SIZE, q, filter: filterParams(selected) })}`,
      { signal: nextSignal() },
    );
    state.total = answer.total;
    render(answer);
  } catch (error) {
    showError(error);
  } finally {
    grid.setAttribute("aria-busy", "false");
  }
}

function render({ items, total, offset }) {
  const pages = Math.max(1, Math.ceil(total / PAGE_SIZE));
  const matching = state.q || state.selected.size ? ` matching ${[state.q && `“${state.q}”`, ...filterParams(state.selected)].filter(Boolean).join(", ")}` : "";
  let summary = `${offset + 1}–${offset + items.length} of ${total} artworks${matching}`;
  if (!total) summary = matching ? `No artwork${matching}.` : "The collection is empty.";
  else if (!items.length) summary = `Page ${state.page} is past the end: ${total} artworks${matching} fill ${pages}.`;
  $("browse-summary").textContent = summary;
  $("browse-grid").replaceChildren(...items.map(card));
  $("browse-pager").hidden = pages === 1 && state.page === 1;
  $("browse-page").textContent = `Page ${state.page} of ${pages}`;
  $("browse-prev").disabled = state.page <= 1;
  $("browse-next").disabled = state.page >= pages;
}

function card(artwork) {
  const label = artwork.title || artwork.external_id;
  return el(
    "li",
    {},
    el(
      "a",
      { class: "card", href: `#/artworks/${artwork.id}` },
      el("span", { class: "thumb" },
        el("img", {
          src: artwork.thumbnail_url,
          alt: "",
          loading: "lazy",
          decoding: "async",
          width: artwork.width,
          height: artwork.height,
        })),
      el("span", { class: "card-title" }, label),
      el("span", { class: "card-meta" }, artwork.external_id),
    ),
  );
}
