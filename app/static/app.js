// The curator's page: a hash router over four views (browse, artwork, search, upload).
// Plain ES modules, no build step; every request goes to the service that served the page.

import { initArtwork, showArtwork } from "./artwork.js";
import { initBrowse, showBrowse } from "./browse.js";
import { clearError, initMessages, setStatus } from "./messages.js";
import { initSearch, showSearch } from "./search.js";
import { initSettings } from "./settings.js";
import { initUpload, showUpload } from "./upload.js";

const TITLES = { browse: "Collection", artwork: "Artwork", search: "Search", upload: "Upload" };
const TOP_LEVEL = new Set(["browse", "search", "upload"]);

/** "#/artworks/12" → {view: "artwork", id: "12"}; "#/search?q=x" → {view: "search", params}. */
function parseHash(hash) {
  const [path, search = ""] = hash.replace(/^#\/?/, "").split("?");
  const params = new URLSearchParams(search);
  const [head, id] = path.split("/");
  if (head === "artworks" && id) return { view: "artwork", id: decodeURIComponent(id), params };
  if (TOP_LEVEL.has(head)) return { view: head, params };
  return { view: "browse", params };
}

function navigate(hash) {
  location.hash = hash;
}

let firstRoute = true;

function route() {
  const { view, id, params } = parseHash(location.hash);
  clearError();
  setStatus("");
  for (const section of document.querySelectorAll("main > .view")) {
    section.hidden = section.id !== `view-${view}`;
  }
  for (const link of document.querySelectorAll("[data-nav]")) {
    const current = link.dataset.nav === view || (view === "artwork" && link.dataset.nav === "browse");
    if (current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${TITLES[view]} · artalign`;
  // After a navigation, keyboard and screen-reader users start at the new view, not at the
  // link they pressed; the first load leaves focus where the browser puts it.
  if (!firstRoute) document.getElementById("main").focus({ preventScroll: true });
  firstRoute = false;
  window.scrollTo(0, 0);

  if (view === "browse") showBrowse(params);
  else if (view === "artwork") showArtwork(id);
  else if (view === "search") showSearch(params);
  else showUpload();
}

initMessages();
initSettings({ onSaved: setStatus });
initBrowse({ navigate });
initArtwork();
initSearch();
initUpload();
window.addEventListener("hashchange", route);
route();
