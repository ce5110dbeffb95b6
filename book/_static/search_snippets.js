// Search result snippets from the page's prose, not from its buttons.
// Sphinx's search (searchtools.js) builds each snippet from the text of the page's
// [role=main] element, which in this theme also holds the launch/download buttons, the
// navigation and the "On this page" list: a page whose match is not in the first lines
// showed only "...Binder". Here those parts are removed before the text is taken, white
// space is collapsed, and a page without the term in its text shows its opening lines.
(function () {
  const SKIP = [
    ".headerlink", "script", "style", ".bd-header-article", ".header-article-items",
    ".article-header-buttons", ".dropdown-launch-buttons", ".dropdown-download-buttons",
    ".prev-next-area", ".bd-sidebar-secondary", ".bd-sidebar-primary", "nav",
    ".cell_input .copybtn", ".toggle-details__summary",
  ];
  function patch() {
    if (typeof Search === "undefined" || Search._prosePatched) return;
    Search._prosePatched = true;
    Search.htmlToText = (htmlString, anchor) => {
      const doc = new DOMParser().parseFromString(htmlString, "text/html");
      for (const query of SKIP) doc.querySelectorAll(query).forEach((el) => el.remove());
      let block = null;
      if (anchor) block = doc.querySelector(`[role="main"] ${anchor}`);
      if (!block) block = doc.querySelector("article") || doc.querySelector('[role="main"]');
      if (!block) return "";
      let text = block.textContent;
      // a glossary term: its definition follows in the next <dd>
      if (block.tagName === "DT" && block.nextElementSibling)
        text += " — " + block.nextElementSibling.textContent;
      return text.replace(/\s+/g, " ").trim();
    };
    // Sphinx passes the stemmed terms ("lotteri" for "lottery"): look for each term, then
    // for it without its last one or two letters; take 240 characters around the first hit.
    Search.makeSearchSummary = (htmlText, keywords, anchor) => {
      const text = Search.htmlToText(htmlText, anchor);
      if (text === "") return null;
      const lower = text.toLowerCase();
      let at = -1;
      for (const k of [...keywords].map((k) => k.toLowerCase())) {
        const edge = /^[a-z0-9]/.test(k) ? "(?<![\\p{L}\\p{N}])" : "";  // none inside Chinese
        for (let cut = 0; cut <= Math.max(0, Math.min(2, k.length - 3)) && at < 0; cut++) {
          const stem = k.slice(0, k.length - cut).replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
          at = lower.search(new RegExp(edge + stem, "u"));
        }
        if (at > -1) break;
      }
      const start = at > 120 ? at - 120 : 0;
      const p = document.createElement("p");
      p.classList.add("context");
      p.textContent = (start ? "..." : "") + text.substr(start, 240).trim() +
        (start + 240 < text.length ? "..." : "");
      return p;
    };
  }
  patch();
  document.addEventListener("DOMContentLoaded", patch);
})();
