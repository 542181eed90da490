// The demo page (/): read an image, POST /v1/grounded, draw the answer with view.js; 4xx messages shown as sent.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  let imageUrl = null;  // data URL of the chosen file

  function readFile(file) {
    const reader = new FileReader();
    reader.onload = () => { imageUrl = reader.result; $("status").textContent = `image: ${file.name} (${file.size} bytes)`; };
    reader.readAsDataURL(file);
  }

  $("image").addEventListener("change", (e) => { if (e.target.files[0]) readFile(e.target.files[0]); });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault(); drop.classList.remove("over");
    if (e.dataTransfer.files[0]) readFile(e.dataTransfer.files[0]);
  });
  $("token").value = localStorage.getItem("vigorl-token") || "";

  function showError(text) {
    $("error").textContent = text;
    $("error").hidden = false;
  }

  $("ask").addEventListener("submit", async (e) => {
    e.preventDefault();
    $("error").hidden = true;
    if (!imageUrl) { showError("choose an image first"); return; }
    const token = $("token").value.trim();
    localStorage.setItem("vigorl-token", token);
    const body = {
      image: imageUrl, query: $("query").value, task: $("task").value, mode: $("mode").value, return_crops: true,
      options: $("options").value.split("\n").map((s) => s.trim()).filter(Boolean),
      sampling: {max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value)},
    };
    const headers = {"Content-Type": "application/json"};
    if (token) headers.Authorization = "Bearer " + token;
    $("send").disabled = true;
    $("status").textContent = "running...";
    const sentImage = imageUrl;
    try {
      const response = await fetch("v1/grounded", {method: "POST", headers, body: JSON.stringify(body)});
      const text = await response.text();
      let json = null;
      try { json = JSON.parse(text); } catch (_) { /* not JSON: shown as text below */ }
      if (!response.ok) {
        const err = json && json.error;
        showError(`HTTP ${response.status}: ` + (err ? err.message + (err.param ? `  [param: ${err.param}]` : "") : text));
        $("status").textContent = "";
        return;
      }
      $("status").textContent = `${json.id}: ${json.steps.length} steps, ${json.zooms.length} zooms`;
      Vigorl.renderTrace($("result"), json, sentImage);
    } catch (err) {
      showError("request failed: " + err);
      $("status").textContent = "";
    } finally {
      $("send").disabled = false;
    }
  });
})();
