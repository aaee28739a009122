// The API key the page sends with writes (X-API-Key). It is typed into the Settings dialog
// and kept in this browser's localStorage, never in the page or its URLs.

const STORAGE_KEY = "artalign.apiKey";

export function apiKey() {
  return localStorage.getItem(STORAGE_KEY) || "";
}

/**
 * Opens the Settings dialog, saying why when `reason` is given. Resolves with the API key
 * once the dialog closes (empty when none was given), so a write can go on where it stopped.
 */
export function openSettings(reason = "") {
  const dialog = document.getElementById("settings");
  const why = document.getElementById("settings-reason");
  why.textContent = reason;
  why.hidden = !reason;
  document.getElementById("settings-key").value = apiKey();
  dialog.showModal();
  document.getElementById("settings-key").focus();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(apiKey()), { once: true });
  });
}

export function initSettings({ onSaved }) {
  const dialog = document.getElementById("settings");
  document.getElementById("settings-open").addEventListener("click", () => openSettings());
  document.getElementById("settings-cancel").addEventListener("click", () => dialog.close());
  document.getElementById("settings-form").addEventListener("submit", () => {
    const key = document.getElementById("settings-key").value.trim();
    if (key) localStorage.setItem(STORAGE_KEY, key);
    else localStorage.removeItem(STORAGE_KEY);
    onSaved(key ? "API key saved in this browser." : "API key removed from this browser.");
  });
}
