"use strict";
// Renders tagbeam's pages (tagbeam/pages.py) from the JSON in #page-data. Every string from the
// data goes into the page as a text node or an attribute value, never as markup.
(function () {
  const DATA = JSON.parse(document.getElementById("page-data").textContent);
  const root = document.getElementById("page");
  const SVG_NS = "http://www.w3.org/2000/svg";
  const MAX_CURVE_POINTS = 300;

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  function setAttrs(node, attrs) {
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.setAttribute("class", value);
      else node.setAttribute(key, String(value));
    }
  }
  function fmt(value, digits = 3) {
    return value === null || value === undefined || Number.isNaN(value) ? "n/a" : Number(value).toFixed(digits);
  }
  function note(text) { return el("p", { class: "note" }, text); }
  function table(header, rows, opts = {}) {
    const head = el("tr", {}, header.map((h, i) => el("th", { class: i < (opts.nameColumns || 1) ? "name" : null }, h)));
    const body = rows.map((row) => {
      const tr = el("tr", { class: row.cls || null });
      row.cells.forEach((cell, i) => tr.append(el("td", { class: i < (opts.nameColumns || 1) ? "name" : null }, cell)));
      return tr;
    });
    return el("table", { class: opts.cls || null }, el("thead", {}, head), el("tbody", {}, body));
  }
  function definitions(pairs) {
    return el("dl", {}, pairs.filter((p) => p[1] !== null && p[1] !== undefined).map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  }

  // --- charts: a plain SVG line chart ---------------------------------------------------------------
  function chart(opts) {
    const W = opts.width || 320, H = opts.height || 230, L = 44, R = 10, T = 22, B = 34;
    const [x0, x1] = opts.x, [y0, y1] = opts.y;
    const sx = (x) => L + ((x - x0) / (x1 - x0 || 1)) * (W - L - R);
    const sy = (y) => H - B - ((y - y0) / (y1 - y0 || 1)) * (H - T - B);
    const node = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: opts.cls || null, role: "img" });
    node.append(svg("text", { x: L, y: 14 }, opts.title || ""));
    for (let i = 0; i <= 4; i++) {
      const y = y0 + ((y1 - y0) * i) / 4, x = x0 + ((x1 - x0) * i) / 4;
      node.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: sy(y), y2: sy(y) }));
      node.append(svg("text", { x: 4, y: sy(y) + 4 }, fmt(y, 2)));
      node.append(svg("text", { x: sx(x) - 8, y: H - B + 14 }, opts.integerX ? Math.round(x) : fmt(x, 2)));
    }
    node.append(svg("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
    node.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
    node.append(svg("text", { x: W / 2 - 20, y: H - 4 }, opts.xLabel || ""));
    node.append(svg("text", { x: L + 4, y: T + 10 }, opts.yLabel || ""));
    (opts.series || []).forEach((s, i) => {
      if (!s.points.length) return;
      const points = s.points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ");
      node.append(svg("polyline", { class: `s${i} series`, points, "data-name": s.name || null }));
      if (s.name) node.append(svg("text", { x: W - R - 70, y: T + 12 + 13 * i, class: `s${i}` }, s.name));
    });
    for (const m of opts.marks || []) {
      const dot = svg("circle", { class: m.cls, cx: sx(m.x), cy: sy(m.y), r: m.r || 4 });
      if (m.title) dot.append(svg("title", {}, m.title));
      node.append(dot);
    }
    node.scale = { sx, sy };
    return node;
  }
  function bars(counts, opts) {
    const W = opts.width || 260, H = opts.height || 120, L = 34, B = 18, T = 18;
    const top = Math.max(1, ...counts), w = (W - L - 6) / counts.length;
    const node = svg("svg", { width: W, height: H, class: "histogram", role: "img" });
    node.append(svg("text", { x: L, y: 12 }, opts.title || ""));
    node.append(svg("text", { x: 2, y: T + 8 }, String(top)));
    node.append(svg("text", { x: L, y: H - 4 }, opts.left || ""), svg("text", { x: W - 24, y: H - 4 }, opts.right || ""));
    counts.forEach((c, i) => {
      const h = ((H - B - T) * c) / top;
      const bar = svg("rect", { class: "bar", x: L + i * w, y: H - B - h, width: Math.max(1, w - 1), height: h });
      bar.append(svg("title", {}, `${opts.binLabel ? opts.binLabel(i) : i}: ${c}`));
      node.append(bar);
    });
    return node;
  }

  // --- scores: exact float32 values, the evaluation code's ">= threshold" -------------------------
  function floats(b64) {
    const bin = atob(b64 || "");
    const view = new DataView(new ArrayBuffer(bin.length));
    for (let i = 0; i < bin.length; i++) view.setUint8(i, bin.charCodeAt(i));
    const out = new Float64Array(bin.length / 4);
    for (let i = 0; i < out.length; i++) out[i] = view.getFloat32(4 * i, true);
    return out;
  }
  function countAtLeast(desc, t) {  // desc sorted decreasingly
    let lo = 0, hi = desc.length;
    while (lo < hi) { const mid = (lo + hi) >> 1; if (desc[mid] >= t) lo = mid + 1; else hi = mid; }
    return lo;
  }
  // Precision, recall and F1 exactly as trainer/evaluation.py computes them (zero_division = 0):
  // scores and the threshold are float32, a label is predicted when score >= threshold.
  function statsAt(label, t) {
    const thr = Math.fround(t);
    const tp = countAtLeast(label.posScores, thr), fp = countAtLeast(label.negScores, thr);
    const fn = label.support - tp;
    return {
      threshold: thr, tp, fp, fn,
      exact: label.neg_floor === null || thr > label.neg_floor,
      precision: tp + fp > 0 ? tp / (tp + fp) : 0,
      recall: tp + fn > 0 ? tp / (tp + fn) : 0,
      f1: 2 * tp + fp + fn > 0 ? (2 * tp) / (2 * tp + fp + fn) : 0,
    };
  }
  function prCurve(label) {
    const pos = label.posScores, neg = label.negScores, points = [];
    let i = 0, j = 0;
    while (i < pos.length || j < neg.length) {
      const s = Math.max(i < pos.length ? pos[i] : -Infinity, j < neg.length ? neg[j] : -Infinity);
      if (label.neg_floor !== null && s <= label.neg_floor) break;
      while (i < pos.length && pos[i] === s) i++;
      while (j < neg.length && neg[j] === s) j++;
      points.push([i / label.support, i / (i + j)]);
    }
    if (points.length <= MAX_CURVE_POINTS) return points;
    const step = points.length / MAX_CURVE_POINTS, thinned = [];
    for (let k = 0; k < MAX_CURVE_POINTS; k++) thinned.push(points[Math.floor(k * step)]);
    thinned.push(points[points.length - 1]);
    return thinned;
  }

  // --- the evaluation section: shared by the model report and the predict summary -----------------
  function labelName(ev, k) { return ev.labels[k]; }
  function renderEvaluation(ev) {
    const out = el("div", { class: "evaluation" });
    ev.per_label.forEach((label) => { label.posScores = floats(label.pos); label.negScores = floats(label.neg); });
    out.append(el("h2", {}, "Labels"));
    out.append(el("p", {}, `${ev.examples} evaluated example(s); thresholds: each label's tuned threshold (F1 at the `
      + `default ${ev.default_threshold} in the table for comparison). Click a label for its curve, threshold control and examples.`));
    out.append(table(["label", "support", "AP", "tuned threshold", "precision", "recall", "F1", `F1 at ${ev.default_threshold}`],
      ev.per_label.map((l, k) => ({ cells: [el("a", { href: `#label-${k}` }, labelName(ev, k)), l.support, fmt(l.ap),
        fmt(ev.thresholds[k], 4), fmt(l.at_tuned.precision), fmt(l.at_tuned.recall), fmt(l.at_tuned.f1), fmt(l.at_default.f1)] }))));
    out.append(renderConfusion(ev));
    if (ev.cam_note) out.append(note(ev.cam_note));
    if (ev.gallery_note) out.append(note(ev.gallery_note));
    const toggle = el("input", { type: "checkbox", id: "show-cams", checked: "checked" });
    toggle.addEventListener("change", () => document.body.classList.toggle("hide-cams", !toggle.checked));
    if (!ev.cam_note) out.append(el("p", {}, el("label", {}, toggle, " show where the model looked (class activation maps) over the gallery images")));
    const open = ev.labels.length <= 30;
    ev.per_label.forEach((label, k) => {
      const details = el("details", { class: "label", id: `label-${k}`, "data-label-index": k, open: open ? "open" : null },
        el("summary", {}, `${labelName(ev, k)} - support ${label.support}, AP ${fmt(label.ap)}`));
      let filled = false;
      const fill = () => { if (!filled) { filled = true; details.append(renderLabel(ev, label, k)); } };
      if (open) fill(); else details.addEventListener("toggle", fill);
      out.append(details);
    });
    return out;
  }
  function renderConfusion(ev) {
    const box = el("section", { id: "confusions" }, el("h3", {}, "False positives: which true labels were present"));
    box.append(el("p", {}, "Row: the label that fired wrongly (at its tuned threshold); column: the labels the example truly had. "
      + "A large cell means the row label is confused with the column label."));
    const c = ev.confusion;
    if (!c.table) {
      box.append(el("p", {}, `${ev.labels.length} labels are too many for a table: each label's section lists the true labels of its false positives.`));
      return box;
    }
    const top = Math.max(1, ...c.rows.flat().map((pair) => pair[1]));
    const header = ["fired wrongly \\ true", ...ev.labels, "no label"];
    const rows = ev.labels.map((name, k) => {
      const counts = new Array(ev.labels.length).fill(0);
      for (const [j, n] of c.rows[k]) counts[j] = n;
      const cells = counts.map((n) => { const td = el("span", {}, n || ""); td.dataset.count = n; return td; });
      return { cells: [name, ...cells, c.none[k] || ""] };
    });
    const t = table(header, rows, { cls: "confusion" });
    t.querySelectorAll("td span").forEach((span) => {
      const n = Number(span.dataset.count);
      if (n) span.parentNode.style.background = `rgba(209, 47, 31, ${(0.1 + 0.7 * n / top).toFixed(2)})`;
    });
    box.append(t);
    return box;
  }
  function renderLabel(ev, label, k) {
    const box = el("div", {});
    const facts = [["support (test positives)", label.support], ["average precision", fmt(label.ap)],
      ["tuned threshold", fmt(ev.thresholds[k], 4)],
      ["at the tuned threshold", `precision ${fmt(label.at_tuned.precision)}, recall ${fmt(label.at_tuned.recall)}, F1 ${fmt(label.at_tuned.f1)}`]];
    box.append(definitions(facts));
    if (label.support === 0) {
      box.append(note(`No example of the ${ev.examples} in this split has this label: there is no precision-recall curve and no `
        + "recall to show. Every prediction of it is a false positive (see the gallery below)."));
    }
    const row = el("div", { class: "row" });
    let curve = null;
    if (label.support > 0) {
      curve = chart({ title: "precision-recall (test)", x: [0, 1], y: [0, 1], xLabel: "recall", yLabel: "precision", cls: "pr-curve",
        series: [{ points: prCurve(label) }] });
      const tuned = statsAt(label, ev.thresholds[k]);
      const mark = svg("circle", { class: "tuned", cx: curve.scale.sx(tuned.recall), cy: curve.scale.sy(tuned.precision), r: 5 });
      mark.append(svg("title", {}, `tuned threshold ${fmt(ev.thresholds[k], 4)}`));
      curve.append(mark);
      row.append(curve);
    }
    row.append(thresholdControl(ev, label, k, curve));
    box.append(row);
    if (label.confused && label.confused.length) {
      box.append(el("p", {}, "Its false positives had these true labels: ",
        label.confused.map(([j, n]) => `${labelName(ev, j)} (${n})`).join(", ")));
    }
    box.append(renderGallery(ev, k));
    return box;
  }
  function thresholdControl(ev, label, k, curve) {
    const start = ev.thresholds[k];
    const range = el("input", { type: "range", min: 0, max: 1, step: 0.001, value: start, class: "thr-range", "aria-label": "threshold" });
    const number = el("input", { type: "number", min: 0, max: 1, step: "any", value: String(start), class: "thr-number" });
    const output = el("output", { class: "thr-out" });
    const reset = el("button", { type: "button" }, "back to the tuned threshold");
    let dot = null;
    if (curve) { dot = svg("circle", { class: "current", r: 7, cx: -20, cy: -20 }); curve.append(dot); }
    function show(value) {
      const s = statsAt(label, value);
      for (const key of ["threshold", "tp", "fp", "fn", "precision", "recall", "f1"]) output.dataset[key] = String(s[key]);
      output.textContent = `at ${fmt(s.threshold, 4)}: precision ${fmt(s.precision)} (${s.tp} of ${s.tp + s.fp} predicted), `
        + `recall ${fmt(s.recall)} (${s.tp} of ${label.support}), F1 ${fmt(s.f1)}`
        + (s.exact ? "" : ` - not exact: below ${fmt(label.neg_floor, 4)} the page keeps only the count of negatives`);
      if (dot && label.support > 0) { dot.setAttribute("cx", curve.scale.sx(s.recall)); dot.setAttribute("cy", curve.scale.sy(s.precision)); }
    }
    range.addEventListener("input", () => { number.value = range.value; show(Number(range.value)); });
    number.addEventListener("input", () => { if (number.value !== "") { range.value = number.value; show(Number(number.value)); } });
    reset.addEventListener("click", () => { number.value = String(start); range.value = start; show(start); });
    show(start);
    return el("div", { class: "control" }, el("h3", {}, "Threshold"),
      el("label", {}, "threshold ", range, " ", number), " ", reset, output,
      el("p", {}, "Computed in this page from the stored test scores, as the evaluation code does (predicted when score >= threshold)."));
  }
  function renderGallery(ev, k) {
    const box = el("div", { class: "label-gallery" });
    const groups = (ev.gallery.items || {})[String(k)];
    if (!groups) {
      box.append(el("p", {}, ev.gallery.labels_note || "No gallery for this label."));
      return box;
    }
    const titles = { fp: "Most confident false positives", fn: "Least confident missed positives", tp: "Correct (true positives)" };
    for (const kind of ["fp", "fn", "tp"]) {
      const items = groups[kind] || [];
      box.append(el("h3", {}, `${titles[kind]} (${items.length})`));
      if (!items.length) { box.append(el("p", {}, kind === "fp" ? "None at the tuned threshold." : kind === "fn" ? "None: every positive was found." : "None.")); continue; }
      box.append(el("div", { class: "gallery" }, items.map((item) => figure(ev, item, k))));
    }
    return box;
  }
  function figure(ev, item, k) {
    const frame = el("div", { class: "imgbox" });
    if (item.thumb) {
      frame.append(el("img", { class: "photo", src: item.thumb, alt: `example ${item.id}` }));
      if (item.cam) frame.append(el("img", { class: "cam", src: item.cam, alt: `where the model looked for ${labelName(ev, k)}` }));
    } else {
      frame.append(el("span", { class: "missing" }, "The image of this example is not stored with the model, so it cannot be shown."));
    }
    const names = (ids) => (ids.length ? ids.map((j) => labelName(ev, j)).join(", ") : "(none)");
    return el("figure", { class: "thumb" }, frame, el("figcaption", {}, el("div", {}, item.id),
      el("div", {}, `score ${fmt(item.score)}`), el("div", {}, `true: ${names(item.true)}`), el("div", {}, `predicted: ${names(item.pred)}`)));
  }
  function learningCurves(history) {
    const box = el("section", { id: "learning-curves" }, el("h2", {}, "Learning curves"));
    const names = Object.keys(history || {}).filter((n) => !n.startsWith("val_") && n !== "epoch_time_s" && n !== "lr" && (history[n] || []).length);
    if (!names.length) { box.append(el("p", {}, "No training history is stored in this model folder (history.json).")); return box; }
    const row = el("div", { class: "row" });
    for (const name of names) {
      const series = [{ name: "train", points: history[name].map((v, i) => [i + 1, v]) }];
      if ((history[`val_${name}`] || []).length) series.push({ name: "val", points: history[`val_${name}`].map((v, i) => [i + 1, v]) });
      const all = series.flatMap((s) => s.points.map((p) => p[1]));
      const n = Math.max(...series.map((s) => s.points.length));
      let lo = Math.min(...all), hi = Math.max(...all);
      if (hi === lo) { hi += 0.5; lo -= 0.5; }
      row.append(chart({ title: name, x: [1, Math.max(2, n)], y: [lo, hi], xLabel: "epoch", integerX: true, series }));
    }
    box.append(row);
    return box;
  }

  // --- pages ----------------------------------------------------------------------------------------
  function metricsTable(m) {
    const rows = [["macro F1", m.at_default.macro_f1, m.at_tuned.macro_f1], ["micro F1", m.at_default.micro_f1, m.at_tuned.micro_f1],
      ["macro precision", m.at_default.macro_precision, m.at_tuned.macro_precision],
      ["macro recall", m.at_default.macro_recall, m.at_tuned.macro_recall]];
    return el("div", {}, table(["metric", `at ${m.default_threshold}`, "at tuned thresholds"],
      rows.map((r) => ({ cells: [r[0], fmt(r[1]), fmt(r[2])] })), { cls: "metrics" }),
      el("p", {}, `mAP (macro average precision, labels with positives): ${fmt(m.macro_average_precision)}; micro AP ${fmt(m.micro_average_precision)}`
        + (m.labels_without_positives ? `; ${m.labels_without_positives} label(s) without positives left out` : "")));
  }
  function modelPage(d) {
    const s = d.summary;
    root.append(el("h1", {}, d.title));
    for (const text of s.notes || []) root.append(note(text));
    const box = el("section", { id: "summary" }, el("h2", {}, "Summary"));
    const splits = Object.entries(s.dataset.splits || {}).map(([k, v]) => `${k} ${v}`).join(", ");
    box.append(definitions([["model folder", s.model_dir], ["dataset", s.dataset.path], ["examples per split", splits || "unknown"],
      ["labels", `${s.dataset.labels.length}: ${s.dataset.labels.join(", ")}`],
      ["backbone", s.backbone], ["image size", s.image_size], ["training", s.training], ["thresholds tuned on", s.tuned_on]]));
    if (s.options_changed) {
      box.append(el("h3", {}, "Options that differ from the defaults"));
      box.append(s.options_changed.length ? table(["flag", "value", "default"], s.options_changed.map((o) => ({ cells: o.map(String) })))
        : el("p", {}, "None: every option has its default value."));
    }
    if (s.metrics) { box.append(el("h3", {}, "Test metrics")); box.append(metricsTable(s.metrics)); }
    root.append(box);
    if (d.evaluation) root.append(renderEvaluation(d.evaluation));
    else root.append(note(d.evaluation_note));
    root.append(learningCurves(d.history));
  }
  function predictPage(d) {
    const s = d.summary;
    root.append(el("h1", {}, d.title));
    for (const text of s.notes || []) root.append(note(text));
    const box = el("section", { id: "summary" }, el("h2", {}, "Summary"));
    box.append(definitions(s.facts));
    box.append(el("h3", {}, "Rejected rows by reason"));
    if (!s.rejected.length) box.append(el("p", {}, "No row was rejected."));
    else box.append(table(["reason", "rows", "examples"], s.rejected.map((r) => ({ cells: [r.reason, r.count, r.examples.join("; ")] })), { nameColumns: 3 }));
    root.append(box);
    const dist = el("section", { id: "distributions" }, el("h2", {}, "Scores and predicted labels"));
    dist.append(el("p", {}, `Per label: the histogram of scores over ${s.scored} scored row(s) (${d.bins} bins from 0 to 1), and how often it was predicted at its threshold.`));
    const row = el("div", { class: "row" });
    d.labels.forEach((name, k) => {
      row.append(el("div", { class: "hist", "data-label-index": k }, bars(d.histograms[k], { title: "", left: "0", right: "1",
        binLabel: (i) => `${fmt(i / d.bins, 2)}-${fmt((i + 1) / d.bins, 2)}` }),
      el("div", {}, `${name}: predicted ${d.predicted_counts[k]} time(s) (threshold ${fmt(d.thresholds[k], 4)})`)));
    });
    dist.append(row);
    root.append(dist);
    const gal = el("section", { id: "predictions" }, el("h2", {}, `Some predictions (${d.gallery.length})`));
    if (!d.gallery.length) gal.append(el("p", {}, "No row was scored, so there is nothing to show."));
    gal.append(el("div", { class: "gallery" }, d.gallery.map((item) => {
      const frame = el("div", { class: "imgbox" });
      if (item.thumb) frame.append(el("img", { class: "photo", src: item.thumb, alt: `row ${item.id}` }));
      else frame.append(el("span", { class: "missing" }, "No image is kept for this row."));
      return el("figure", { class: "thumb" }, frame, el("figcaption", {}, el("div", {}, item.id),
        el("div", {}, `predicted: ${item.labels.length ? item.labels.map(([k, p]) => `${d.labels[k]} ${fmt(p, 2)}`).join(", ") : "(none)"}`)));
    })));
    root.append(gal);
    if (d.evaluation) root.append(renderEvaluation(d.evaluation));
    else root.append(note(d.evaluation_note));
  }
  function nightPage(d) {
    root.append(el("h1", {}, d.title));
    const box = el("section", { id: "decision" }, el("h2", {}, "Decision"));
    box.append(definitions(d.facts));
    root.append(box);
    const health = el("section", { id: "health" }, el("h2", {}, "Data health"));
    if (d.health_note) health.append(note(d.health_note));
    health.append(d.health.length ? table(["figure", "value"], d.health.map((h) => ({ cells: h.map(String) }))) : el("p", {}, "No health figures were recorded."));
    root.append(health);
    const cmp = el("section", { id: "comparison" }, el("h2", {}, "Champion and challenger on the same test examples"));
    if (!d.comparison) cmp.append(note(d.comparison_note));
    else {
      const c = d.comparison;
      cmp.append(el("p", {}, `${c.examples} test example(s); AP and F1 at each model's own thresholds. Rows in red: the challenger is worse.`));
      cmp.append(table(["label", "support", "AP champion", "AP challenger", "delta AP", "F1 champion", "F1 challenger", "delta F1"],
        c.rows.map((r) => ({ cls: r.worse ? "worse" : (r.better ? "better" : null),
          cells: [r.label, r.support, fmt(r.champion.ap), fmt(r.challenger.ap), fmt(r.delta_ap), fmt(r.champion.f1), fmt(r.challenger.f1), fmt(r.delta_f1)] })),
        { cls: "comparison" }));
    }
    root.append(cmp);
    if (d.index_href) root.append(el("p", {}, el("a", { href: d.index_href }, "all nights")));
  }
  function nightsIndex(d) {
    root.append(el("h1", {}, d.title));
    if (!d.nights.length) { root.append(el("p", {}, "No night has run in this workspace yet.")); return; }
    root.append(table(["night", "decision", "reason"], d.nights.map((n) => ({ cls: n.promoted ? "better" : null,
      cells: [n.href ? el("a", { href: n.href }, n.id) : n.id, n.decision, n.reason] }))));
  }
  root.textContent = "";
  ({ model: modelPage, predict: predictPage, night: nightPage, nights_index: nightsIndex })[DATA.kind](DATA);
})();
