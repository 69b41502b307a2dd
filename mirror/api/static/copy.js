// Copy buttons beside the pull commands. Without this script the commands are plain selectable text.
"use strict";
(function () {
  async function copy(text) {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return;
    }
    const area = document.createElement("textarea"); // plain http on a non-local address: no Clipboard API
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }

  for (const button of document.querySelectorAll("button[data-copy]")) {
    const code = button.previousElementSibling;
    if (!code) continue;
    button.hidden = false;
    button.addEventListener("click", async function () {
      try {
        await copy(code.textContent);
        button.textContent = "Copied";
      } catch (err) {
        button.textContent = "Select and copy";
      }
      setTimeout(function () { button.textContent = "Copy"; }, 1500);
    });
  }
})();
