// Enhancements only: every page works without this script.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  // The connector form shows the fields of the chosen authentication type only.
  const type = document.getElementById("type");
  const sets = document.querySelectorAll("fieldset[data-type]");
  const show = () => sets.forEach((set) => { set.hidden = type && set.dataset.type !== type.value; });
  if (type) { type.addEventListener("change", show); show(); }
  // Copy buttons.
  document.querySelectorAll("button.copy").forEach((button) => {
    button.hidden = false;
    button.addEventListener("click", () => {
      const text = document.getElementById(button.dataset.copy).textContent;
      navigator.clipboard.writeText(text).then(() => { button.textContent = button.dataset.copied; });
    });
  });
  // Buttons that ask first (the form is sent only once confirmed).
  document.querySelectorAll("button[data-confirm]").forEach((button) => {
    button.addEventListener("click", (event) => {
      if (!window.confirm(button.dataset.confirm)) { event.preventDefault(); }
    });
  });
  // A refused form: its message is where the keyboard goes.
  const problem = document.getElementById("problem");
  if (problem) { problem.focus(); }
});
