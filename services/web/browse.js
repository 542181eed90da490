// The file browser (/browse): a JSONL of predictions, GRPO rollouts or /v1/grounded answers, read in the
// browser (nothing is uploaded); filter by verdict, benchmark, category and text; a click opens the trace view.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const {el} = Vigorl;
  let records = [];  // {raw, line, correct (true/false/null), benchmark, category}
  const images = new Map();  // file name -> File, from the chosen folder

  function correctOf(r) {
    if (typeof r.score === "number") return r.score >= 1;
    if (r.details && typeof r.details.accuracy === "number") return r.details.accuracy >= 1;
    return null;
  }

  function parse(text, name) {
    const out = [], lines = text.split("\n");
    lines.forEach((line, i) => {
      if (!line.trim()) return;
      try {
        const raw = JSON.parse(line);
        out.push({raw, line: i + 1, correct: correctOf(raw), benchmark: raw.benchmark || "",
                  category: raw.category || ""});
      } catch (err) {
        if (i < lines.length - 1 || out.length === 0) throw new Error(`${name}:${i + 1}: ${err.message}`);
      }  // a partial last line (a killed writer) is skipped
    });
    return out;
  }

  function fillSelect(select, values) {
    select.replaceChildren(el("option", {value: ""}, "all"));
    for (const v of [...new Set(values)].filter(Boolean).sort()) select.append(el("option", {value: v}, v));
  }

  function shown() {
    const verdict = $("verdict").value, bench = $("benchmark").value, cat = $("category").value;
    const q = $("search").value.trim().toLowerCase();
    return records.filter((r) =>
      (verdict === "all" || (verdict === "correct" ? r.correct === true : r.correct === false)) &&
      (!bench || r.benchmark === bench) && (!cat || r.category === cat) &&
      (!q || [r.raw.id, r.raw.sample_id, r.raw.question, r.raw.pred_answer, r.raw.answer].some(
        (s) => s && String(s).toLowerCase().includes(q))));
  }

  function renderList() {
    const body = $("records").querySelector("tbody");
    body.replaceChildren();
    const rows = shown();
    $("status").textContent = `${rows.length} of ${records.length} traces shown`;
    for (const r of rows) {
      const x = r.raw;
      const score = typeof x.score === "number" ? x.score : (typeof x.reward === "number" ? x.reward : "");
      const tr = el("tr", {class: "row", "data-line": r.line});
      tr.append(el("td", {}, x.id || `${x.sample_id}#${x.group_index ?? 0} (step ${x.step ?? "?"})`), el("td", {}, r.benchmark),
                el("td", {}, r.category), el("td", {class: r.correct === true ? "ok" : r.correct === false ? "bad" : ""}, String(score)),
                el("td", {}, x.finish || ""), el("td", {}, x.pred_answer ?? ""), el("td", {}, x.answer || ""));
      tr.addEventListener("click", () => open(r, tr));
      body.append(tr);
    }
  }

  function imageFor(raw) {
    const path = (raw.images || [])[0];
    if (!path) return null;
    const name = path.split(/[\\/]/).pop();
    return images.get(name) || null;
  }

  function open(r, tr) {
    document.querySelectorAll("tr.row.open").forEach((n) => n.classList.remove("open"));
    tr.classList.add("open");
    const x = r.raw, response = Vigorl.toResponse(x);
    const meta = {};
    if (x.question) meta.question = x.question;
    if (x.options && x.options.length) meta.options = x.options.join(" | ");
    if (x.answer) meta["ground truth"] = x.answer;
    if (typeof x.score === "number") meta.score = `${x.score} (score_original ${x.score_original})`;
    if (typeof x.reward === "number") meta.reward = x.reward;
    if (x.category) meta.category = x.category;
    if (x.images && x.images[0]) meta["image file"] = x.images[0] + (imageFor(x) ? "" : " (not loaded: choose its folder above)");
    const file = imageFor(x);
    const draw = (src) => {
      const answer = x.answer_point_original;
      Vigorl.renderTrace($("view"), response, src, {meta, truthBox: x.bbox || null,
                                                    answerPoint: answer ? [answer.x, answer.y] : null});
      $("view").scrollIntoView({block: "start"});
    };
    if (file) {
      const reader = new FileReader();
      reader.onload = () => draw(reader.result);
      reader.readAsDataURL(file);
    } else {
      draw(null);
    }
  }

  $("file").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (!file) return;
    $("error").hidden = true;
    try {
      records = parse(await file.text(), file.name);
    } catch (err) {
      $("error").textContent = String(err.message || err);
      $("error").hidden = false;
      records = [];
    }
    fillSelect($("benchmark"), records.map((r) => r.benchmark));
    fillSelect($("category"), records.map((r) => r.category));
    $("view").replaceChildren();
    renderList();
  });
  $("images").addEventListener("change", (e) => {
    for (const f of e.target.files) images.set(f.name, f);
    $("status").textContent += ` (${images.size} images loaded)`;
  });
  for (const id of ["verdict", "benchmark", "category", "search"]) $(id).addEventListener("input", renderList);
})();
