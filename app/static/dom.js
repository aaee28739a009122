// Small DOM helpers shared by the views. Text always goes in as text nodes, never as HTML,
// so catalogue text cannot inject markup.

const SVG_NS = "http://www.w3.org/2000/svg";

/** el("a", {href: "#", class: "card"}, "text", child, ...) */
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  setAttributes(node, attributes);
  node.append(...children.filter((child) => child !== null && child !== undefined && child !== false));
  return node;
}

/** Like el, in the SVG namespace. */
export function svgEl(tag, attributes = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  setAttributes(node, attributes);
  return node;
}

function setAttributes(node, attributes) {
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      node.addEventListener(name.slice(2), value);
    } else {
      node.setAttribute(name, value === true ? "" : String(value));
    }
  }
}

/** Calls fn once the calls have paused for `ms` milliseconds (no request per keystroke). */
export function debounce(fn, ms) {
  let timer = null;
  const debounced = (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
  debounced.cancel = () => clearTimeout(timer);
  return debounced;
}

export function formatScore(score) {
  return Number(score).toFixed(3);
}
