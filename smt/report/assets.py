"""The report pages' hand-written CSS and JavaScript (no library, no network: the pages work from ``file://``).

``VIEWER_JS`` drives the comparison viewer (:mod:`smt.report.viewer`): two stacked images (the left choice clipped
to the slider's position over the right choice), one transform for both so zoom and pan stay in step, and the
keyboard. ``TABLE_JS`` makes every ``table.sortable`` sortable by a click on its header (numbers by value).
``COST_JS`` fills the cost table from ``timings/infer.js`` when that measurement file exists (it is written by the
run, not by DVC: wall-clock never enters a tracked output).
"""
from __future__ import annotations

__all__ = ["CSS", "VIEWER_JS", "TABLE_JS", "COST_JS"]

CSS = """\
body{font-family:system-ui,sans-serif;margin:1.2em auto;max-width:72em;padding:0 1em;color:#222}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.2em;margin-top:1.4em}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #bbb;padding:.25em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}
table.sortable th{cursor:pointer}table.sortable th:after{content:" \\2195";color:#aaa}
.verdict{font-size:1.05em;padding:.5em .8em;border-left:4px solid #080;background:#f6fff6}
.verdict.bad{border-color:#c00;background:#fff6f6}
.thumbs{display:flex;flex-wrap:wrap;gap:.6em}.thumbs a{text-decoration:none;color:#222;font-size:.8em;width:160px}
.thumbs img{display:block;width:160px;height:120px;object-fit:contain;background:#eee;border:1px solid #ccc}
.note{color:#555;font-size:.9em}code{background:#f3f3f3;padding:0 .2em}
details>summary{cursor:pointer;font-weight:600;margin:.6em 0}
.viewer-bar{display:flex;flex-wrap:wrap;gap:.8em;align-items:center;margin:.5em 0}
.stage{position:relative;overflow:hidden;height:72vh;background:#333;border:1px solid #999;cursor:grab;
 user-select:none;touch-action:none}
.stage.dragging{cursor:grabbing}
.layer{position:absolute;left:0;top:0;transform-origin:0 0}
.layer img{position:absolute;left:0;top:0;display:block;max-width:none}
.stage.pixels img{image-rendering:pixelated}
.split-line{position:absolute;top:0;bottom:0;width:2px;background:#fff;box-shadow:0 0 3px #000;pointer-events:none}
.tag{position:absolute;top:.3em;padding:.1em .4em;background:rgba(0,0,0,.6);color:#fff;font-size:.85em}
#slider{width:100%}.keys{font-size:.85em;color:#555}
"""

TABLE_JS = """\
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var dir = th.dataset.dir === "asc" ? -1 : 1;
      th.dataset.dir = dir === 1 ? "asc" : "desc";
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.v || a.cells[col].textContent;
        var y = b.cells[col].dataset.v || b.cells[col].textContent;
        var nx = parseFloat(x), ny = parseFloat(y);
        return dir * (isNaN(nx) || isNaN(ny) ? x.localeCompare(y) : nx - ny);
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""

COST_JS = """\
(function () {
  var box = document.getElementById("cost");
  var t = window.SMT_TIMINGS && window.SMT_TIMINGS.infer;
  if (!box || !t) return;
  var rows = "";
  Object.keys(t).forEach(function (m) {
    var e = t[m];
    if (!e || typeof e !== "object" || e.seconds_per_image === undefined) return;
    rows += "<tr><td>" + m + "</td><td>" + e.seconds_per_image.toFixed(3) + "</td><td>" +
      (e.peak_mb === undefined ? "&ndash;" : Math.round(e.peak_mb)) + "</td></tr>";
  });
  if (!rows) return;
  box.innerHTML = "<table class=\\"cost\\"><thead><tr><th>method</th><th>seconds per image</th>" +
    "<th>peak memory (MB)</th></tr></thead><tbody>" + rows + "</tbody></table>" +
    "<p class=\\"note\\">Measured by this machine's last run of the inference stage " +
    "(<code>timings/infer.json</code>, " +
    "not a DVC output: wall-clock differs between runs).</p>";
})();
"""

VIEWER_JS = """\
(function () {
  var D = window.VIEWER, stage = document.getElementById("stage"), layer = document.getElementById("layer");
  var imgA = document.getElementById("imgA"), imgB = document.getElementById("imgB");
  var selA = document.getElementById("selA"), selB = document.getElementById("selB");
  var slider = document.getElementById("slider"), line = document.getElementById("line");
  var view = {scale: 1, x: 0, y: 0}, split = 0.5, drag = null;

  function fmt(c) {
    if (c.psnr_y === null) return c.name + ": reference";
    return c.name + ": PSNR-Y " + c.psnr_y.toFixed(2) + " dB, colour shift " + c.color_shift.toFixed(2);
  }
  function choose(sel, img, tag, i) {
    sel.value = String(i);
    img.src = D.choices[i].src;
    img.dataset.choice = D.choices[i].name;
    document.getElementById(tag).textContent = fmt(D.choices[i]);
  }
  function apply() {
    layer.style.transform = "translate(" + view.x + "px," + view.y + "px) scale(" + view.scale + ")";
    var w = stage.clientWidth, cut = split * w;
    var left = (cut - view.x) / view.scale;  // the cut in image pixels: A is shown left of it
    imgA.style.clipPath = "inset(0 " + Math.max(0, D.width - left) + "px 0 0)";
    line.style.left = cut + "px";
    stage.classList.toggle("pixels", view.scale >= 2);
    document.getElementById("zoom").textContent = Math.round(view.scale * 100) + "%";
  }
  function zoomAt(factor, px, py) {
    var s = Math.min(32, Math.max(0.05, view.scale * factor));
    view.x = px - (px - view.x) * s / view.scale;
    view.y = py - (py - view.y) * s / view.scale;
    view.scale = s;
    apply();
  }
  function fit() {
    var s = Math.min(1, stage.clientWidth / D.width, stage.clientHeight / D.height);
    view = {scale: s, x: (stage.clientWidth - D.width * s) / 2, y: (stage.clientHeight - D.height * s) / 2};
    apply();
  }
  function actual() {  // 100%, centred where the image is smaller than the stage
    view = {scale: 1, x: Math.max(0, (stage.clientWidth - D.width) / 2),
            y: Math.max(0, (stage.clientHeight - D.height) / 2)};
    apply();
  }
  function setSplit(v) { split = Math.min(1, Math.max(0, v)); slider.value = Math.round(split * 1000); apply(); }
  function swap() { var a = selA.value; choose(selA, imgA, "tagA", +selB.value); choose(selB, imgB, "tagB", +a); }

  D.choices.forEach(function (c, i) {
    [selA, selB].forEach(function (sel) {
      var o = document.createElement("option");
      o.value = String(i); o.textContent = (i + 1) + ": " + c.name; sel.appendChild(o);
    });
  });
  selA.addEventListener("change", function () { choose(selA, imgA, "tagA", +selA.value); });
  selB.addEventListener("change", function () { choose(selB, imgB, "tagB", +selB.value); });
  slider.addEventListener("input", function () { setSplit(slider.value / 1000); });
  stage.addEventListener("wheel", function (e) {
    e.preventDefault();
    var r = stage.getBoundingClientRect();
    zoomAt(e.deltaY < 0 ? 1.25 : 0.8, e.clientX - r.left, e.clientY - r.top);
  }, {passive: false});
  stage.addEventListener("pointerdown", function (e) {
    var r = stage.getBoundingClientRect();
    drag = e.shiftKey ? {split: true} : {x: e.clientX - view.x, y: e.clientY - view.y};
    if (drag.split) setSplit((e.clientX - r.left) / stage.clientWidth);
    stage.classList.add("dragging");
    stage.setPointerCapture(e.pointerId);
  });
  stage.addEventListener("pointermove", function (e) {
    if (!drag) return;
    if (drag.split) { setSplit((e.clientX - stage.getBoundingClientRect().left) / stage.clientWidth); return; }
    view.x = e.clientX - drag.x; view.y = e.clientY - drag.y; apply();
  });
  stage.addEventListener("pointerup", function () { drag = null; stage.classList.remove("dragging"); });
  document.getElementById("fit").addEventListener("click", fit);
  document.getElementById("actual").addEventListener("click", actual);
  document.getElementById("swap").addEventListener("click", swap);
  document.addEventListener("keydown", function (e) {
    if (e.target.tagName === "SELECT") return;
    var k = e.key, n = parseInt(k, 10), step = 60;
    if (n >= 1 && n <= D.choices.length) {
      if (e.altKey || e.shiftKey) choose(selB, imgB, "tagB", n - 1); else choose(selA, imgA, "tagA", n - 1);
    } else if (k === "ArrowLeft" && !e.shiftKey) setSplit(split - 0.05);
    else if (k === "ArrowRight" && !e.shiftKey) setSplit(split + 0.05);
    else if (k === "ArrowLeft") { view.x += step; apply(); }
    else if (k === "ArrowRight") { view.x -= step; apply(); }
    else if (k === "ArrowUp") { view.y += step; apply(); }
    else if (k === "ArrowDown") { view.y -= step; apply(); }
    else if (k === "+" || k === "=") zoomAt(1.25, stage.clientWidth / 2, stage.clientHeight / 2);
    else if (k === "-") zoomAt(0.8, stage.clientWidth / 2, stage.clientHeight / 2);
    else if (k === "f") fit();
    else if (k === "0") actual();
    else if (k === "s" || k === " ") swap();
    else if (k === "n" && D.next) location.href = D.next;
    else if (k === "p" && D.prev) location.href = D.prev;
    else return;
    e.preventDefault();
  });
  window.addEventListener("resize", apply);
  choose(selA, imgA, "tagA", D.left);
  choose(selB, imgB, "tagB", D.right);
  if (D.width > stage.clientWidth || D.height > stage.clientHeight) fit(); else actual();
  setSplit(0.5);
})();
"""
