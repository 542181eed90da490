// The trace view: one /v1/grounded answer drawn over its image. Shared by the demo page (/), the file
// browser (/browse) and the HTML that `vigorl demo` writes. No dependencies; works offline.
//
//   Vigorl.renderTrace(container, response, imageSrc, {meta: {label: value}, truthBox: [x1, y1, x2, y2],
//                      answerPoint: [x, y]})
//
// The SVG overlay's viewBox is the ORIGINAL image's size, so every mark sits at the answer's original-frame
// coordinates: zoom windows (rect.window), zoom points (rect.zoom-point), and each step's points (g.point,
// numbered with the step's 1-based number over all steps; one outside the image sits hollow on the nearest edge),
// the ground-truth box and the answer point when given (file browser). Hovering a step highlights its points and the
// other way round; hovering a zoom highlights its window.
(function () {
  "use strict";
  const SVG = "http://www.w3.org/2000/svg";

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  const fmt = (v) => (Math.round(v * 10) / 10).toString();

  // Link list items and drawn marks by a data attribute: hovering either highlights both.
  function linkHover(root, attr, value) {
    const all = () => root.querySelectorAll(`[${attr}="${value}"]`);
    for (const node of all()) {
      node.addEventListener("mouseenter", () => all().forEach((n) => n.classList.add("hl")));
      node.addEventListener("mouseleave", () => all().forEach((n) => n.classList.remove("hl")));
    }
  }

  // A point outside the image (random or wrong-frame models write those) is drawn hollow on the nearest edge,
  // as the demo's PNG does (vigorl_core/evals/trace_image.py place); its data-x/data-y keep the real coordinates.
  function place(x, y, width, height, r) {
    if (x >= 0 && x < width && y >= 0 && y < height) return [x, y, true];
    return [Math.min(Math.max(x, r + 1), width - r - 2), Math.min(Math.max(y, r + 1), height - r - 2), false];
  }

  function overlay(response, width, height, truthBox, answerPoint) {
    const r = Math.max(width, height) / 90;
    const layer = svg("svg", {class: "overlay", viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none"});
    if (truthBox) {
      const [x1, y1, x2, y2] = truthBox;
      layer.append(svg("rect", {class: "truth", x: x1, y: y1, width: x2 - x1, height: y2 - y1}));
    }
    response.zooms.forEach((zoom, j) => {
      if (zoom.window) {
        const [x1, y1, x2, y2] = zoom.window.original;
        layer.append(svg("rect", {class: "window", "data-zoom": j, x: x1, y: y1, width: x2 - x1, height: y2 - y1}));
        layer.append(svg("text", {class: "zoom-label", x: x1 + r * 0.4, y: y1 + r * 2.2, "font-size": r * 2}, `Z${j + 1}`));
      }
      const p = zoom.point.original;
      layer.append(svg("rect", {class: "zoom-point", "data-zoom": j, "data-x": p.x, "data-y": p.y,
                                x: p.x - r, y: p.y - r, width: 2 * r, height: 2 * r}));
    });
    response.steps.forEach((step, i) => {
      for (const point of step.points) {
        const p = point.original;
        const [x, y, inside] = place(p.x, p.y, width, height, r);
        const g = svg("g", {class: "point" + (inside ? "" : " outside"), "data-step": i, "data-x": p.x, "data-y": p.y});
        g.append(svg("circle", {cx: x, cy: y, r: r}));
        g.append(svg("text", {x: Math.min(x + r * 1.2, width - r * 2.5), y: Math.max(y - r * 0.8, r * 2),
                              "font-size": r * 2.2}, String(i + 1)));
        layer.append(g);
      }
    });
    if (answerPoint) {
      const [x, y] = answerPoint, ring = r * 1.6;
      layer.append(svg("circle", {class: "answer", cx: x, cy: y, r: ring}));
      layer.append(svg("text", {class: "answer-label", x: x + ring * 1.1, y: y + ring, "font-size": r * 2.2}, "A"));
    }
    return layer;
  }

  // The area drawn on when the image is not available (e.g. GRPO rollouts): grey, sized to hold the points.
  function placeholder(response) {
    let [w, h] = response.image && response.image.original_size ? response.image.original_size : [0, 0];
    if (!w) {
      const xs = [], ys = [];
      response.steps.forEach((s) => s.points.forEach((p) => { xs.push(p.original.x); ys.push(p.original.y); }));
      w = Math.max(100, ...xs.map((x) => x * 1.1)); h = Math.max(100, ...ys.map((y) => y * 1.1));
    }
    const bg = svg("svg", {class: "placeholder", viewBox: `0 0 ${w} ${h}`});
    bg.append(svg("rect", {x: 0, y: 0, width: w, height: h, fill: "#d8d8d8"}));
    bg.append(svg("text", {x: w / 2, y: h / 2, "text-anchor": "middle", "font-size": Math.max(w, h) / 30,
                           fill: "#777"}, "image not available"));
    return [bg, w, h];
  }

  function summary(response, meta) {
    const box = el("div", {class: "summary"});
    box.append(el("div", {class: "answer"}, "Answer: " + (response.answer ?? "(none)")));
    const dl = el("dl");
    const add = (k, v) => { if (v !== undefined && v !== null && v !== "") { dl.append(el("dt", {}, k), el("dd", {}, String(v))); } };
    add("finish", response.finish);
    add("turns", response.turns);
    if (response.usage) {
      const u = response.usage;
      add("tokens", `prompt ${u.prompt_tokens} (image ${u.image_tokens}), completion ${u.completion_tokens}, total ${u.total_tokens}`);
    }
    if (response.latency_ms !== undefined) add("latency", `${fmt(response.latency_ms)} ms`);
    if (response.image && response.image.original_size) {
      add("image", `${response.image.original_size.join("x")} (model frame ${(response.image.model_size || []).join("x")})`);
    }
    for (const [k, v] of Object.entries(meta || {})) add(k, v);
    if (response.errors && response.errors.length) add("parse errors", response.errors.join("; "));
    box.append(dl);
    return box;
  }

  function turns(response) {
    const out = el("div");
    const count = Math.max(response.turns || 1, ...response.steps.map((s) => s.turn + 1),
                           ...response.zooms.map((z) => z.turn + 1));
    for (let t = 0; t < count; t++) {
      const section = el("section", {class: "turn", "data-turn": t});
      section.append(el("h3", {}, `Turn ${t + 1}`));
      const list = el("ol", {class: "steps"});
      response.steps.forEach((step, i) => {
        if (step.turn !== t) return;
        const li = el("li", {class: "step" + (step.points.length ? " has-point" : ""), "data-step": i, value: i + 1},
                      step.text);
        if (step.points.length) {
          li.append(el("span", {class: "coords"},
                       step.points.map((p) => `(${fmt(p.original.x)}, ${fmt(p.original.y)})`).join(" ")));
        }
        list.append(li);
      });
      section.append(list);
      response.zooms.forEach((zoom, j) => {
        if (zoom.turn !== t) return;
        const row = el("div", {class: "zoom", "data-zoom": j});
        const what = el("div", {class: "what"});
        const p = zoom.point.original;
        what.append(el("div", {}, `Z${j + 1}: zoom at (${fmt(p.x)}, ${fmt(p.y)})` +
                                  (zoom.clamped ? " (window moved inside the image)" : "")));
        if (zoom.window) what.append(el("div", {}, "window " + zoom.window.original.map(fmt).join(", ")));
        if (zoom.crop_png) {
          row.append(el("img", {class: "crop", alt: `crop Z${j + 1}`, src: "data:image/png;base64," + zoom.crop_png}));
        }
        row.append(what);
        section.append(row);
      });
      out.append(section);
    }
    return out;
  }

  function renderTrace(container, response, imageSrc, opts) {
    opts = opts || {};
    container.replaceChildren();
    const root = el("div", {class: "trace"});
    const figure = el("div", {class: "figure"});
    const stage = el("div", {class: "stage"});
    let width, height;
    if (imageSrc && response.image && response.image.original_size) {
      [width, height] = response.image.original_size;
      stage.append(el("img", {class: "original", src: imageSrc, alt: "input image"}));
    } else {
      let bg;
      [bg, width, height] = placeholder(response);
      stage.append(bg);
    }
    stage.append(overlay(response, width, height, opts.truthBox, opts.answerPoint));
    figure.append(stage);
    const side = el("div", {class: "turns"});
    side.append(summary(response, opts.meta), turns(response));
    if (response.text) {
      const raw = el("details", {class: "raw"});
      raw.append(el("summary", {}, "raw response"), el("pre", {}, response.text));
      side.append(raw);
    }
    root.append(figure, side);
    container.append(root);
    response.steps.forEach((_, i) => linkHover(root, "data-step", i));
    response.zooms.forEach((_, j) => linkHover(root, "data-zoom", j));
    return root;
  }

  // A prediction (predictions.jsonl) or a GRPO rollout (rollouts.jsonl) in the shape of a /v1/grounded answer.
  // Predictions keep no crop settings, so their zooms have points but no windows or crops.
  function toResponse(record) {
    if (record.object === "grounded.result") return record;
    const [ow, oh] = record.original_size || [0, 0];
    const [mw, mh] = record.model_size || [0, 0];
    const sx = ow && mw ? ow / mw : 1, sy = oh && mh ? oh / mh : 1;
    const both = (x, y) => ({model: {x, y}, original: {x: x * sx, y: y * sy}});
    if (record.trace) {
      const steps = record.trace.steps.map((s) => ({turn: s.turn, text: s.text, points: s.points.map((p) => both(p.x, p.y))}));
      const zooms = [], seen = new Set();
      for (const call of record.trace.tool_calls) {
        if (call.coordinate && !seen.has(call.turn)) {
          seen.add(call.turn);
          zooms.push({turn: call.turn, requested: call.coordinate, point: both(...call.coordinate)});
        }
      }
      return {id: record.id, answer: record.pred_answer, text: record.text, finish: record.finish,
              turns: record.num_turns, steps, zooms, errors: record.trace.errors,
              image: record.original_size ? {original_size: record.original_size, model_size: record.model_size} : null};
    }
    const answer = /<answer>([\s\S]*?)<\/answer>/.exec(record.text || "");
    return {id: record.sample_id, answer: answer ? answer[1].trim() : null, text: record.text, finish: record.finish, turns: 1, zooms: [], errors: [],
            steps: [{turn: 0, text: "(whole response; points in the model frame)", points: (record.points || []).map(([x, y]) => both(x, y))}],
            image: null};
  }

  window.Vigorl = {renderTrace, toResponse, el};
})();
