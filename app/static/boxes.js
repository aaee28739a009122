// An image with an SVG overlay for boxes. Boxes are [x1, y1, x2, y2] in original image
// pixels; the overlay's viewBox is the original size and stretches over the displayed image,
// so every box is scaled to the displayed size by the browser, whatever that size is.

import { el, svgEl } from "./dom.js";

export class Figure {
  /**
   * src: the image URL; width, height: the original image size in pixels (the box space).
   * loading: "lazy" for figures in long lists.
   */
  constructor({ src, width, height, alt = "", loading = "eager", className = "" }) {
    this.width = width;
    this.height = height;
    this.image = el("img", { src, alt, width, height, loading, decoding: "async", draggable: "false" });
    this.svg = svgEl("svg", {
      class: "overlay",
      viewBox: `0 0 ${width} ${height}`,
      preserveAspectRatio: "none",
      "aria-hidden": "true",
    });
    this.layers = new Map();
    this.element = el("div", { class: `figure ${className}`.trim() }, this.image, this.svg);
  }

  /** A named <g> group, created on first use, so each kind of box can be cleared alone. */
  layer(name) {
    if (!this.layers.has(name)) {
      const group = svgEl("g", { class: `layer-${name}` });
      this.layers.set(name, group);
      this.svg.append(group);
    }
    return this.layers.get(name);
  }

  clear(name) {
    this.layer(name).replaceChildren();
  }

  /** A box; with `label`, a text above it (inside the image), sized to the image. */
  drawBox(name, box, { className = "", opacity, label } = {}) {
    const [x1, y1, x2, y2] = box;
    const rect = svgEl("rect", {
      x: x1, y: y1, width: Math.max(x2 - x1, 0), height: Math.max(y2 - y1, 0), class: className,
    });
    if (opacity !== undefined) rect.style.fillOpacity = String(opacity);
    this.layer(name).append(rect);
    if (label) {
      // Above the box, else below it, else inside its top; from its left edge, or its right
      // edge in the image's right half, so the words stay on the image.
      const size = Math.max(this.width, this.height) / 18;
      let y = y1 > size ? y1 - size / 4 : y2 + size;
      if (y > this.height) y = y1 + size;
      const right = x1 > this.width / 2;
      const text = svgEl("text", {
        x: right ? x2 - 2 : x1 + 2, y, "text-anchor": right ? "end" : "start",
        class: "box-label", "font-size": size.toFixed(1),
      });
      text.textContent = label;
      this.layer(name).append(text);
    }
    return rect;
  }

  /** The original-pixel point under a pointer event, clamped to the image. */
  pointAt(event) {
    const frame = this.image.getBoundingClientRect();
    const x = ((event.clientX - frame.left) / frame.width) * this.width;
    const y = ((event.clientY - frame.top) / frame.height) * this.height;
    return [clamp(x, 0, this.width), clamp(y, 0, this.height)];
  }
}

function clamp(value, low, high) {
  return Math.min(Math.max(value, low), high);
}

/** The box spanned by two points, rounded to whole pixels, with x1 < x2 and y1 < y2. */
function boxFromPoints([ax, ay], [bx, by]) {
  return [Math.min(ax, bx), Math.min(ay, by), Math.max(ax, bx), Math.max(ay, by)].map(Math.round);
}

function boxArea([x1, y1, x2, y2]) {
  return Math.max(x2 - x1, 0) * Math.max(y2 - y1, 0);
}

function contains([x1, y1, x2, y2], [x, y]) {
  return x >= x1 && x <= x2 && y >= y1 && y <= y2;
}

/** The smallest of `fragments` ({box}) that contains the point, or null. */
export function smallestFragmentAt(fragments, point) {
  let best = null;
  for (const fragment of fragments) {
    if (contains(fragment.box, point) && (!best || boxArea(fragment.box) < boxArea(best.box))) {
      best = fragment;
    }
  }
  return best;
}

// A drag shorter than this many displayed pixels is a click, not a box.
const CLICK_SLOP_PX = 5;
// Resize handles: drawn this big, and grabbed within this distance (displayed pixels), so a
// finger on a phone can take them as well as a mouse.
const HANDLE_RADIUS_PX = 6;
const HANDLE_GRAB_PX = 14;
// Each handle names the edges it moves: west, east, north, south.
const HANDLES = {
  nw: "wn", n: "n", ne: "en", e: "e", se: "es", s: "s", sw: "ws", w: "w",
};
const HANDLE_CURSORS = {
  nw: "nwse-resize", se: "nwse-resize", ne: "nesw-resize", sw: "nesw-resize",
  n: "ns-resize", s: "ns-resize", e: "ew-resize", w: "ew-resize",
};

/** Where handle `name` sits on `box`, in original pixels. */
function handlePoint([x1, y1, x2, y2], name) {
  const edges = HANDLES[name];
  const x = edges.includes("w") ? x1 : edges.includes("e") ? x2 : (x1 + x2) / 2;
  const y = edges.includes("n") ? y1 : edges.includes("s") ? y2 : (y1 + y2) / 2;
  return [x, y];
}

/** `box` with the edges of handle `name` moved to `point`, never inverted or empty. */
function resizeBox([x1, y1, x2, y2], name, [x, y]) {
  const edges = HANDLES[name];
  if (edges.includes("w")) x1 = Math.min(x, x2 - 1);
  if (edges.includes("e")) x2 = Math.max(x, x1 + 1);
  if (edges.includes("n")) y1 = Math.min(y, y2 - 1);
  if (edges.includes("s")) y2 = Math.max(y, y1 + 1);
  return [x1, y1, x2, y2].map(Math.round);
}

/**
 * Lets the user draw one box on a figure, with the pointer or the keyboard, and resize it by
 * its eight handles (mouse, touch or pen).
 * onBox(box): a box was drawn, resized, or confirmed with Enter.
 * onClick(point): a click without a drag (to pick a fragment there).
 * onClear(): Escape removed the box.
 */
export class BoxEditor {
  constructor(figure, { onBox, onClick, onClear }) {
    this.figure = figure;
    this.callbacks = { onBox, onClick, onClear };
    this.box = null;
    this.start = null;
    this.resizing = null; // the handle being dragged
    const target = figure.element;
    target.addEventListener("pointerdown", (event) => this.pointerDown(event));
    target.addEventListener("pointermove", (event) => this.pointerMove(event));
    target.addEventListener("pointerup", (event) => this.pointerUp(event));
    target.addEventListener("pointercancel", () => this.cancelDrag());
  }

  /** Original pixels per displayed pixel (1 before the image is laid out). */
  scale() {
    const shown = this.figure.image.getBoundingClientRect().width;
    return shown > 0 ? this.figure.width / shown : 1;
  }

  /** Shows `box` as the selection with its resize handles (null hides it). */
  setBox(box) {
    this.box = box;
    this.figure.clear("selection");
    if (!box) return;
    this.figure.drawBox("selection", box, { className: "selection" });
    const radius = HANDLE_RADIUS_PX * this.scale();
    for (const name of Object.keys(HANDLES)) {
      const [cx, cy] = handlePoint(box, name);
      const handle = svgEl("circle", { cx, cy, r: radius, class: "handle", "data-handle": name });
      this.figure.layer("selection").append(handle);
    }
  }

  /** The handle of the selection within grabbing distance of `point`, or null. */
  handleAt(point) {
    if (!this.box) return null;
    const reach = HANDLE_GRAB_PX * this.scale();
    let best = null;
    let bestDistance = reach;
    for (const name of Object.keys(HANDLES)) {
      const [hx, hy] = handlePoint(this.box, name);
      const distance = Math.hypot(point[0] - hx, point[1] - hy);
      if (distance <= bestDistance) [best, bestDistance] = [name, distance];
    }
    return best;
  }

  pointerDown(event) {
    if (event.button !== 0) return;
    event.preventDefault(); // no image drag, no text selection
    this.figure.element.setPointerCapture(event.pointerId);
    const point = this.figure.pointAt(event);
    this.resizing = this.handleAt(point);
    if (this.resizing) return;
    this.start = point;
    this.startClient = [event.clientX, event.clientY];
  }

  pointerMove(event) {
    const point = this.figure.pointAt(event);
    if (this.resizing) {
      this.setBox(resizeBox(this.box, this.resizing, point));
      return;
    }
    if (!this.start) {
      const hovered = this.handleAt(point);
      this.figure.element.style.cursor = hovered ? HANDLE_CURSORS[hovered] : "";
      return;
    }
    this.setBox(boxFromPoints(this.start, point));
  }

  pointerUp(event) {
    if (this.resizing) {
      this.resizing = null;
      this.callbacks.onBox(this.box);
      return;
    }
    if (!this.start) return;
    const moved = Math.hypot(event.clientX - this.startClient[0], event.clientY - this.startClient[1]);
    const end = this.figure.pointAt(event);
    const start = this.start;
    this.start = null;
    if (moved < CLICK_SLOP_PX) {
      this.callbacks.onClick(end);
      return;
    }
    const box = boxFromPoints(start, end);
    if (boxArea(box) === 0) return;
    this.setBox(box);
    this.callbacks.onBox(box);
  }

  cancelDrag() {
    this.start = null;
    this.resizing = null;
  }

  /**
   * Keyboard editing while the figure has focus: Enter places a box in the middle (or asks
   * for the box shown), arrows move it, Shift+arrows move its bottom-right corner,
   * Ctrl+arrows its top-left corner, Escape clears it.
   * Returns true when the key was used.
   */
  handleKey(event) {
    const { width, height } = this.figure;
    if (event.key === "Enter") {
      if (this.box) {
        this.callbacks.onBox(this.box);
      } else {
        this.setBox([width / 3, height / 3, (2 * width) / 3, (2 * height) / 3].map(Math.round));
      }
      return true;
    }
    if (event.key === "Escape") {
      if (!this.box) return false;
      this.setBox(null);
      this.callbacks.onClear();
      return true;
    }
    const steps = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
    if (!(event.key in steps) || !this.box) return false;
    // 2% of the image per key press: fine enough to aim, coarse enough to cross it quickly.
    const dx = steps[event.key][0] * Math.max(1, Math.round(width * 0.02));
    const dy = steps[event.key][1] * Math.max(1, Math.round(height * 0.02));
    let [x1, y1, x2, y2] = this.box;
    if (event.shiftKey) {
      x2 = clamp(x2 + dx, x1 + 1, width);
      y2 = clamp(y2 + dy, y1 + 1, height);
    } else if (event.ctrlKey) {
      x1 = clamp(x1 + dx, 0, x2 - 1);
      y1 = clamp(y1 + dy, 0, y2 - 1);
    } else {
      const moveX = clamp(dx, -x1, width - x2);
      const moveY = clamp(dy, -y1, height - y2);
      [x1, x2, y1, y2] = [x1 + moveX, x2 + moveX, y1 + moveY, y2 + moveY];
    }
    this.setBox([x1, y1, x2, y2]);
    return true;
  }
}

/** The detector's two most probable words for a box, "gold · bird" ("" when it has none). */
export function seenWords(attributes) {
  return (attributes || []).slice(0, 2).map((entry) => entry.word).join(" · ");
}
