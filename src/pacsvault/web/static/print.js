// Print buttons (recovery codes): a file, not inline code, for the Content-Security-Policy.
"use strict";
document.querySelectorAll("button[data-print]").forEach((button) => {
  button.hidden = false;
  button.addEventListener("click", () => window.print());
});
