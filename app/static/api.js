// The service's JSON API, as the page uses it. Errors arrive as RFC 9457 problem documents
// (application/problem+json); their "detail" is what the curator is shown.

export class ApiError extends Error {
  constructor(status, title, detail, type = "") {
    super(detail);
    this.status = status;
    this.title = title;
    this.type = type; // the problem's "type" URI: what kind of error, for code to tell apart
  }
}

// FastAPI's own validation errors carry a list of {loc, msg} in "detail": name each field.
function describeDetail(detail) {
  if (Array.isArray(detail)) {
    return detail
      .map((entry) => `${(entry.loc || []).filter((part) => part !== "body").join(".")}: ${entry.msg}`)
      .join("; ");
  }
  return typeof detail === "string" ? detail : "";
}

/**
 * Calls the service and returns its JSON answer (null for an empty body).
 * json: a body sent as JSON; form: a FormData sent as multipart; apiKey: sent as X-API-Key.
 * Throws ApiError with a readable message, or the AbortError of a cancelled request.
 */
export async function api(path, { method = "GET", json, form, apiKey, signal } = {}) {
  const headers = { Accept: "application/json, application/problem+json" };
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form; // the browser sets the multipart boundary itself
  }
  if (apiKey) headers["X-API-Key"] = apiKey;

  let response;
  try {
    response = await fetch(path, { method, headers, body, signal });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "Network error", `The service did not answer (${method} ${path}). Is it running?`);
  }
  const type = response.headers.get("Content-Type") || "";
  const payload = type.includes("json") ? await response.json().catch(() => null) : null;
  if (!response.ok) {
    const detail = describeDetail(payload?.detail) || payload?.title || response.statusText;
    throw new ApiError(
      response.status, payload?.title || response.statusText, `${detail} (HTTP ${response.status})`, payload?.type,
    );
  }
  return payload;
}

/** A query string from an object, leaving out empty values; an array value repeats its name. */
export function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    for (const item of Array.isArray(value) ? value : [value]) {
      if (item !== undefined && item !== null && item !== "") search.append(name, String(item));
    }
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

/**
 * Returns a function that hands out a fresh AbortSignal and aborts the previous one:
 * a view that only cares about its latest request (typing, paging) never shows a stale answer.
 */
export function latestOnly() {
  let controller = null;
  return () => {
    controller?.abort();
    controller = new AbortController();
    return controller.signal;
  };
}
