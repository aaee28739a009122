// Upload: an image file (dropped or picked) goes to POST /annotate; ranked phrases come back.

import { api, latestOnly } from "./api.js";
import { clearError, setStatus, showError } from "./messages.js";
import { renderPending, renderPhrases } from "./phrases.js";

const $ = (id) => document.getElementById(id);
const nextSignal = latestOnly();
let previewUrl = null;

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
}

export function showUpload() {
  $("upload-file").focus();
}

async function send(file) {
  clearError();
  if (!file.type.startsWith("image/")) {
    showError(new Error(`${file.name}: not an image (type “${file.type || "unknown"}”). Choose a JPEG or PNG file.`));
    return;
  }
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  $("upload-preview").src = previewUrl;
  $("upload-preview").alt = `The uploaded image ${file.name}`;
  $("upload-name").textContent = `${file.name} · ${(file.size / 1024).toFixed(0)} KiB`;
  $("upload-output").hidden = false;
  const results = $("upload-results");
  renderPending(results, "Finding phrases for the image…");
  const form = new FormData();
  form.append("image", file, file.name);
  try {
    const answer = await api("/annotate", { method: "POST", form, signal: nextSignal() });
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
