// Upload: an image file (dropped or picked) goes to POST /annotate; ranked phrases come back.
// The image can then be kept as a new artwork (POST /artworks, with the API key), after which
// each phrase can be accepted as an annotation of the whole image.

import { api, ApiError, latestOnly } from "./api.js";
import { el } from "./dom.js";
import { clearError, setStatus, showError } from "./messages.js";
import { renderPending, renderPhrases } from "./phrases.js";
import { apiKey, openSettings } from "./settings.js";

const $ = (id) => document.getElementById(id);
const nextSignal = latestOnly();
let previewUrl = null;
let current = null; // {file, items, artwork: {id, external_id, box} once kept}

export function initUpload() {
  const zone = $("dropzone");
  $("upload-file").addEventListener("change", (event) => {
    const [file] = event.target.files;
    if (file) send(file);
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault(); // allows the drop
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    const [file] = event.dataTransfer.files;
    if (file) send(file);
  });
  $("upload-keep").addEventListener("submit", (event) => {
    event.preventDefault();
    keep();
  });
}

export function showUpload() {
  $("upload-file").focus();
}

/** A museum id suggested from a file name: its stem, with runs of other characters as "-". */
function suggestedId(name) {
  const stem = name.replace(/\.[^.]*$/, "");
  return stem.replace(/[^A-Za-z0-9._-]+/g, "-").replace(/^-+|-+$/g, "") || "upload";
}

async function send(file) {
  clearError();
  if (!file.type.startsWith("image/")) {
    showError(new Error(`${file.name}: not an image (type “${file.type || "unknown"}”). Choose a JPEG or PNG file.`));
    return;
  }
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  current = { file, items: [], artwork: null };
  $("upload-preview").src = previewUrl;
  $("upload-preview").alt = `The uploaded image ${file.name}`;
  $("upload-name").textContent = `${file.name} · ${(file.size / 1024).toFixed(0)} KiB`;
  $("upload-output").hidden = false;
  $("upload-keep-id").value = suggestedId(file.name);
  $("upload-keep-title-input").value = file.name.replace(/\.[^.]*$/, "");
  $("upload-keep-save").disabled = false;
  $("upload-keep-saved").hidden = true;
  const results = $("upload-results");
  renderPending(results, "Finding phrases for the image…");
  const form = new FormData();
  form.append("image", file, file.name);
  try {
    const answer = await api("/annotate", { method: "POST", form, signal: nextSignal() });
    current.items = answer.items;
    renderPhrases(results, answer.items);
    setStatus(`${answer.items.length} phrases for ${file.name}.`);
  } catch (error) {
    if (error.name === "AbortError") return;
    results.replaceChildren();
    showError(error);
  } finally {
    $("upload-file").value = ""; // picking the same file again must fire "change" again
  }
}

async function needKey(why) {
  const key = apiKey() || (await openSettings(why));
  if (!key) throw new ApiError(401, "API key needed", `Not saved: ${why.toLowerCase()} (see Settings).`);
  return key;
}

/** Stores the uploaded image as a new artwork; an id already in use is refused, not replaced. */
async function keep() {
  clearError();
  const upload = current;
  if (!upload) return;
  const externalId = $("upload-keep-id").value.trim();
  const title = $("upload-keep-title-input").value.trim();
  const save = $("upload-keep-save");
  save.disabled = true;
  try {
    const key = await needKey("Keeping the image as an artwork needs an API key.");
    const taken = await api(`/artworks/external/${encodeURIComponent(externalId)}`).then(
      () => true,
      (error) => (error.status === 404 ? false : Promise.reject(error)),
    );
    if (taken) {
      throw new ApiError(409, "Id in use", `An artwork with the museum id “${externalId}” exists already: choose another id.`);
    }
    const form = new FormData();
    form.append("image", upload.file, upload.file.name);
    form.append("artwork", JSON.stringify({ external_id: externalId, title: title || externalId, captions: [] }));
    const report = await api("/artworks", { method: "POST", form, apiKey: key });
    // The whole image as the service stored it (its size after decoding, EXIF rotation included).
    const stored = await api(`/artworks/${report.id}`);
    if (current !== upload) return; // another image was uploaded meanwhile
    upload.artwork = { id: report.id, external_id: report.external_id, box: [0, 0, stored.width, stored.height] };
    const note = $("upload-keep-saved");
    note.replaceChildren("Saved as ", el("a", { href: `#/artworks/${report.id}` }, title || externalId),
      ". Accept a phrase to annotate the whole image.");
    note.hidden = false;
    renderPhrases($("upload-results"), upload.items, { onAccept: (item) => acceptForUpload(upload, item) });
    setStatus(`Saved ${upload.file.name} as artwork “${externalId}”.`);
  } catch (error) {
    save.disabled = false;
    showError(error);
  }
}

async function acceptForUpload(upload, item) {
  const key = await needKey(`Saving “${item.phrase}” as an annotation needs an API key.`);
  await api("/annotations", {
    method: "POST",
    json: { artwork_id: upload.artwork.id, box: upload.artwork.box, phrase: item.phrase },
    apiKey: key,
  });
  setStatus(`Saved “${item.phrase}” as an annotation of ${upload.artwork.external_id}.`);
}
