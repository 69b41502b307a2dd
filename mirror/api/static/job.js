// A prefetch's progress, polled from /ui/jobs/<id>.json twice a second until it ends. Without this script the
// page refreshes itself (a <noscript> refresh) while the prefetch runs.
"use strict";
(function () {
  const card = document.getElementById("job");
  if (!card || card.dataset.state !== "running") return;

  function size(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return i === 0 ? n.toFixed(0) + " B" : n.toFixed(1) + " " + units[i];
  }

  function show(job) {
    const bar = document.getElementById("progress");
    bar.max = job.total || 1;
    bar.value = job.done;
    document.getElementById("bytes").textContent = size(job.done) + " / " + size(job.total);
    document.getElementById("what").textContent = job.what;
    document.getElementById("state").textContent = job.state;
    card.dataset.state = job.state;
    const outcome = document.getElementById("outcome");
    if (job.state === "done") {
      outcome.textContent = job.result.map(function (r) {
        return "Cached " + r.blobs + " blobs (" + size(r.bytes) + "), " + size(r.fetched_bytes) +
          " fetched from the upstream, in " + r.seconds + " s.";
      }).join(" ");
    } else if (job.state === "failed") {
      outcome.textContent = "Failed: " + job.error;
    }
  }

  async function poll() {
    try {
      const response = await fetch("/ui/jobs/" + card.dataset.job + ".json", { cache: "no-store", credentials: "same-origin" });
      if (response.ok) {
        const job = await response.json();
        show(job);
        if (job.state !== "running") return;
      }
    } catch (err) {
      // The mirror is restarting or unreachable: try again.
    }
    setTimeout(poll, 500);
  }
  setTimeout(poll, 500);
})();
