// One place for what the page tells the curator: an error banner (role=alert) that shows a
// problem's "detail", and a polite status line for things that went well.

const errorBox = () => document.getElementById("error");

export function showError(error) {
  if (error?.name === "AbortError") return; // a newer request replaced this one: not an error
  document.getElementById("error-text").textContent = error?.message || String(error);
  errorBox().hidden = false;
}

export function clearError() {
  errorBox().hidden = true;
}

// The status toast clears itself: it confirms what happened, it is not a record.
const STATUS_SECONDS = 6;
let statusTimer = null;

export function setStatus(text) {
  document.getElementById("status").textContent = text;
  clearTimeout(statusTimer);
  if (text) statusTimer = setTimeout(() => setStatus(""), STATUS_SECONDS * 1000);
}

export function initMessages() {
  document.getElementById("error-close").addEventListener("click", clearError);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !errorBox().hidden && !event.defaultPrevented) clearError();
  });
}
