// The live parts of the mirror's web page: the fetches in flight, polled from /ui/inflight.json once a second.
// The page is complete without this script (the server renders the same rows); it only keeps them current.
"use strict";
(function () {
  const body = document.getElementById("inflight");
  const empty = document.getElementById("inflight-empty");
  if (!body || !empty) return;

  function size(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return i === 0 ? n.toFixed(0) + " B" : n.toFixed(1) + " " + units[i];
  }

  function cell(tr, text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    tr.append(td);
    return td;
  }

  function row(f) {
    const tr = document.createElement("tr");
    tr.dataset.digest = f.digest;
    cell(tr, f.repo);
    const progress = cell(tr, "", "progress");
    const bar = document.createElement("progress");
    if (f.size) { bar.max = f.size; bar.value = f.written; }
    const figures = document.createElement("span");
    figures.textContent = size(f.written) + " / " + (f.size ? size(f.size) : "?");
    progress.append(bar, figures);
    cell(tr, size(f.speed) + "/s", "num");
    cell(tr, f.clients === null ? "—" : String(f.clients), "num");  // another worker's fetch: not counted here
    return tr;
  }

  async function poll() {
    try {
      const response = await fetch("/ui/inflight.json", { cache: "no-store", credentials: "same-origin" });
      if (response.ok) {
        const data = await response.json();
        body.replaceChildren(...data.fetches.map(row));
        empty.hidden = data.fetches.length > 0;
      }
    } catch (err) {
      // The mirror is restarting or unreachable: keep the last rows and try again.
    }
    setTimeout(poll, 1000);
  }
  setTimeout(poll, 1000);
})();
