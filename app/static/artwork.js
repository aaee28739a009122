// Annotate: one artwork, its detected fragments drawn as outlines; a box (dragged, picked or
// placed with the keyboard) gets ranked phrases, and an accepted phrase is stored as an
// annotation of that box.

import { api, ApiError, latestOnly } from "./api.js";
import { BoxEditor, Figure, seenWords, smallestFragmentAt } from "./boxes.js";
import { el } from "./dom.js";
import { clearError, setStatus, showError } from "./messages.js";
import { renderPending, renderPhrases } from "./phrases.js";
import { apiKey, openSettings } from "./settings.js";

const $ = (id) => document.getElementById(id);
const nextArtworkSignal = latestOnly();
const nextAnnotateSignal = latestOnly();

let artwork = null;
let figure = null;
let editor = null;
let fragments = []; // the outlined ones: every fragment but the whole image
let currentBox = null;

export function initArtwork() {
  $("artwork-stage").addEventListener("keydown", (event) => {
    if (editor?.handleKey(event)) event.preventDefault();
  });
  $("show-fragments").addEventListener("change", (event) => {
    figure?.layer("fragments").classList.toggle("hidden", !event.target.checked);
  });
  $("custom-phrase").addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = $("custom-phrase-text");
    const phrase = input.value.trim();
    if (!phrase) return;
    try {
      await saveAnnotation(phrase);
      input.value = "";
    } catch (error) {
      showError(error);
    }
  });
}

export async function showArtwork(id) {
  artwork = null;
  clearSelection(); // also drops phrases still on their way for the previous artwork
  $("artwork-title").textContent = "Loading…";
  $("artwork-subtitle").textContent = "";
  $("artwork-body").hidden = true; // nothing of the previous artwork stays on screen
  try {
    render(await api(`/artworks/${encodeURIComponent(id)}`, { signal: nextArtworkSignal() }));
  } catch (error) {
    if (error.name !== "AbortError") $("artwork-title").textContent = "Artwork not available";
    showError(error);
  }
}

// How each fragment source reads in the list ("whole" is the image itself and is not listed).
const SOURCE_LABELS = { extracted: "detected", annotation: "annotated", crop: "crop" };

function render(data) {
  artwork = data;
  document.title = `${data.title || data.external_id} · artalign`;
  $("artwork-title").textContent = data.title || data.external_id;
  $("artwork-subtitle").textContent = [data.external_id, `${data.width} × ${data.height} px`].join(" · ");

  figure = new Figure({
    src: data.image_url, width: data.width, height: data.height, alt: data.title || data.external_id,
  });
  $("artwork-stage").setAttribute("aria-label", `Image of ${data.title || data.external_id}: draw a box to find phrases`);
  // The stage fills its column but stays within the window's height: small images grow,
  // large ones shrink, and the overlay follows either way.
  $("artwork-stage").style.setProperty("--aspect", String(data.width / data.height));
  $("artwork-stage").replaceChildren(figure.element);
  editor = new BoxEditor(figure, {
    onBox: (box) => annotate(box),
    onClick: (point) => {
      const fragment = smallestFragmentAt(fragments, point);
      if (fragment) pickFragment(fragment);
    },
    onClear: () => {
      clearSelection();
      setStatus("Box cleared.");
    },
  });

  fragments = (data.fragments || []).filter((fragment) => fragment.source !== "whole");
  figure.layer("fragments").classList.toggle("hidden", !$("show-fragments").checked);
  const items = fragments.map((fragment, index) => {
    const seen = seenWords(fragment.attributes);
    const rect = figure.drawBox("fragments", fragment.box, { className: `fragment ${fragment.source}`, label: seen });
    const [x1, y1, x2, y2] = fragment.box.map(Math.round);
    const label = [SOURCE_LABELS[fragment.source] || fragment.source, seen].filter(Boolean).join(" · ");
    const button = el(
      "button",
      {
        type: "button",
        class: "chip",
        "aria-label": `Fragment ${index + 1} (${label}), ${x2 - x1} by ${y2 - y1} pixels at ${x1}, ${y1}: find phrases`,
        onclick: () => pickFragment(fragment),
      },
      `${index + 1} · ${label}`,
    );
    // Point at the outline the button stands for, so the list and the image read together.
    for (const type of ["mouseenter", "focus"]) button.addEventListener(type, () => rect.classList.add("hot"));
    for (const type of ["mouseleave", "blur"]) button.addEventListener(type, () => rect.classList.remove("hot"));
    return el("li", {}, button);
  });
  $("fragment-list").replaceChildren(...items);
  $("fragment-list").hidden = items.length === 0;

  renderAbout(data);
  $("artwork-body").hidden = false;
}

function renderAbout(data) {
  const rows = Object.entries(data.metadata || {}).filter(([, value]) => value !== null && value !== "");
  $("artwork-metadata").replaceChildren(
    ...rows.flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, String(value))]),
  );
  $("artwork-captions").replaceChildren(...(data.captions || []).map((caption) => el("li", {}, caption)));
  $("artwork-phrases").replaceChildren(
    ...(data.phrases || []).map((phrase) => el("li", { class: "chip static" }, phrase)),
  );
}

/** No box: no phrases, nothing to accept (the phrases shown were for the box). */
function clearSelection() {
  currentBox = null;
  nextAnnotateSignal();
  $("custom-phrase").hidden = true;
  $("annotate-results").replaceChildren(
    el("p", { class: "empty" }, "Select a region of the image to see the phrases that describe it."),
  );
}

function pickFragment(fragment) {
  editor.setBox(fragment.box);
  annotate(fragment.box);
}

async function annotate(box) {
  clearError();
  currentBox = box;
  const results = $("annotate-results");
  renderPending(results, "Finding phrases for the box…");
  $("custom-phrase").hidden = false;
  try {
    const answer = await api("/annotate", {
      method: "POST",
      json: { artwork_id: artwork.id, box },
      signal: nextAnnotateSignal(),
    });
    renderPhrases(results, answer.items, { onAccept: (item) => saveAnnotation(item.phrase) });
    setStatus(`${answer.items.length} phrases for the box [${box.map(Math.round).join(", ")}].`);
  } catch (error) {
    if (error.name === "AbortError") return;
    results.replaceChildren(el("p", { class: "empty" }, "Could not find phrases for this box."));
    showError(error);
  }
}

async function saveAnnotation(phrase) {
  // The artwork and box the phrase was accepted for, even if the dialog below takes a while.
  const artworkId = artwork.id;
  const box = currentBox;
  const key = apiKey() || (await openSettings(`Saving “${phrase}” as an annotation needs an API key.`));
  if (!key) {
    throw new ApiError(401, "API key needed", "Not saved: saving an annotation needs an API key (see Settings).");
  }
  await api("/annotations", {
    method: "POST",
    json: { artwork_id: artworkId, box, phrase },
    apiKey: key,
  });
  setStatus(`Saved “${phrase}” as an annotation of box [${box.map(Math.round).join(", ")}].`);
}
