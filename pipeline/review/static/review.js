// The review page's only script: "select all" on the queue, and the bulk reason list follows the chosen action.
// Everything works without it; the server checks every value either way.
document.addEventListener("DOMContentLoaded", function () {
  var boxes = function () { return document.querySelectorAll("input[name=item_id]"); };
  var shown = document.getElementById("selected-count");
  var count = function () {
    if (!shown) return;
    var n = Array.prototype.filter.call(boxes(), function (b) { return b.checked; }).length;
    shown.textContent = n ? "(" + n + ")" : "";
  };
  var all = document.getElementById("select-all");
  if (all) {
    all.addEventListener("change", function () {
      boxes().forEach(function (b) { b.checked = all.checked; });
      count();
    });
  }
  boxes().forEach(function (b) { b.addEventListener("change", count); });

  var action = document.getElementById("bulk-action");
  var reason = document.getElementById("bulk-reason");
  var sync = function () {
    reason.querySelectorAll("optgroup").forEach(function (group) {
      var on = group.dataset.action === action.value;
      group.disabled = !on;
      group.hidden = !on;
    });
    var chosen = reason.selectedOptions[0];
    if (chosen && chosen.parentElement.tagName === "OPTGROUP" && chosen.parentElement.disabled) reason.value = "";
  };
  if (action && reason) {
    action.addEventListener("change", sync);
    sync();
  }
});
