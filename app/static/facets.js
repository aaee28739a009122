// Facets: the catalogue's metadata values with how many artworks hold each, as checkboxes.
// Ticked values of one field are alternatives; fields all apply (as the service's filter).
// The counts come from GET /facets under the current filter, so they always add up to
// what the browse grid or the search would show.

import { api, latestOnly, query } from "./api.js";
import { el } from "./dom.js";
import { showError } from "./messages.js";

/** "classification:vase" strings of a filter (field -> Set of values), in a stable order. */
export function filterParams(selected) {
  return [...selected.entries()].flatMap(([field, values]) => [...values].sort().map((value) => `${field}:${value}`));
}

/** The filter in a hash's parameters (repeated `filter=field:value`). */
export function parseFilters(params) {
  const selected = new Map();
  for (const item of params.getAll("filter")) {
    const at = item.indexOf(":");
    if (at < 1) continue;
    const field = item.slice(0, at);
    if (!selected.has(field)) selected.set(field, new Set());
    selected.get(field).add(item.slice(at + 1));
  }
  return selected;
}

export class Facets {
  /** container: where the fieldsets go; onChange(selected) when a box is ticked or cleared. */
  constructor(container, { onChange }) {
    this.container = container;
    this.onChange = onChange;
    this.selected = new Map();
    this.nextSignal = latestOnly();
  }

  /** Counts for the filter `selected` (plus `extra` parameters such as q), then draws them. */
  async load(selected, extra = {}) {
    this.selected = selected;
    try {
      const answer = await api(`/facets${query({ ...extra, filter: filterParams(selected) })}`,
        { signal: this.nextSignal() });
      this.render(answer.fields);
    } catch (error) {
      if (error.name !== "AbortError") showError(error);
    }
  }

  render(fields) {
    const sets = Object.entries(fields).map(([field, values]) => {
      const chosen = this.selected.get(field) || new Set();
      // A ticked value stays listed (count 0) even when the other fields leave none of it.
      const listed = [...values, ...[...chosen].filter((v) => !values.some((x) => x.value === v))
        .map((value) => ({ value, count: 0 }))];
      if (!listed.length) return null;
      return el(
        "fieldset",
        { class: "facet" },
        el("legend", {}, field),
        ...listed.map(({ value, count }) => {
          const box = el("input", { type: "checkbox", value, checked: chosen.has(value) });
          box.addEventListener("change", () => this.toggle(field, value, box.checked));
          return el("label", { class: "facet-value" }, box, ` ${value} `, el("span", { class: "count" }, `${count}`));
        }),
      );
    });
    this.container.replaceChildren(...sets.filter(Boolean));
    this.container.hidden = !this.container.children.length;
  }

  toggle(field, value, on) {
    const selected = new Map([...this.selected].map(([f, values]) => [f, new Set(values)]));
    if (!selected.has(field)) selected.set(field, new Set());
    if (on) selected.get(field).add(value);
    else selected.get(field).delete(value);
    if (!selected.get(field).size) selected.delete(field);
    this.onChange(selected);
  }
}
