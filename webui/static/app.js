// Progressive enhancement of the plain pages: search an upload without reloading, drag-and-drop, paste, and
// drag a box on the query picture to search with that region. Links ("more like this", the collection) are plain
// links, so every search by id has its own URL and the back button works.
(() => {
  const form = document.getElementById("search-form");
  const fileInput = document.getElementById("file");
  const drop = document.getElementById("drop");
  const status = document.getElementById("status");
  const grid = document.getElementById("results");
  const section = document.getElementById("results-section");
  const title = document.getElementById("results-title");
  const querySection = document.getElementById("query");
  const queryImg = document.getElementById("query-img");
  const region = document.getElementById("region");
  const boxEl = document.getElementById("box");
  const collection = document.getElementById("collection");
  const indexSel = document.getElementById("index");
  const kSel = document.getElementById("k");
  const copiesBox = document.getElementById("copies");
  const textLabel = document.getElementById("text-label");
  const textInput = document.getElementById("text");
  const textIndexes = (form.dataset.textIndexes || "").split(",").filter(Boolean);
  let lastFile = null;

  // The text box is for indexes of a model with a text tower (CLIP) only.
  const textOn = () => textIndexes.includes(indexSel.value);
  function showText() {
    textLabel.hidden = !textOn();
    textInput.disabled = !textOn();
  }
  const typed = () => (textOn() ? textInput.value.trim() : "");

  const say = (text, isError) => { status.textContent = text; status.className = isError ? "error" : ""; };
  const filterForm = document.getElementById("filter-form");
  // the filters as shown in "Search within" (what you see is what is searched), for uploads and result links
  const within = () => {
    const out = new URLSearchParams();
    if (!filterForm) return out;
    for (const name of ["folder", "after", "before", "camera", "tag"]) {
      for (const el of filterForm.querySelectorAll(`[name=${name}]`)) if (el.value) out.append(name, el.value);
    }
    return out;
  };
  const params = (extra) => {
    const out = new URLSearchParams({ k: kSel.value, index: indexSel.value, ...extra });
    for (const [name, value] of within()) out.append(name, value);
    return out;
  };

  function render(data) {
    grid.replaceChildren();
    for (const r of data.results) {
      const li = document.createElement("li");
      const copy = r.copy && r.copy.verified;
      li.className = `card ${r.similarity || ""}${copy ? " copy" : ""}`;
      li.dataset.id = r.id;
      li.innerHTML = `<a class="more" title="more like this"><img alt=""></a>
        <div class="caption"><span class="rank">#${r.rank}</span><span class="score"></span>
        <span class="path"></span><a class="open" target="_blank" rel="noopener">open</a></div>`;
      li.querySelector("a.more").href = `/?${params({ id: r.id, index: data.index, k: data.k })}`;
      li.querySelector("img").src = r.thumbnail_url;
      li.querySelector("img").alt = r.path;
      li.querySelector(".score").textContent = r.similarity ? `${r.score.toFixed(3)} · ${r.similarity}` : r.score.toFixed(3);
      li.querySelector(".path").textContent = r.path;
      li.querySelector(".path").title = r.path;
      li.querySelector(".open").href = r.image_url;
      if (copy) {
        const badge = document.createElement("span");
        badge.className = "badge";
        badge.textContent = `copy of the query · ${r.copy.inliers} points`;
        badge.title = `${r.copy.inliers} matching points, ${Math.round(100 * r.copy.agreement)}% agree${r.copy.mirrored ? ", mirrored" : ""}`;
        li.querySelector(".open").before(badge);
      }
      grid.appendChild(li);
    }
    const what = data.text ? ` for “${data.text}”` : "";
    const among = data.matched != null ? ` of ${data.matched} matching` : "";
    title.textContent = `Top ${data.results.length}${what}${among} in ${data.index} (${data.encoder}, ${Math.round(data.took_ms)} ms)`;
    section.hidden = false;
    if (collection) collection.hidden = true;
    say(data.message || "");
  }

  async function call(url, options) {
    say("Searching…");
    let resp;
    try { resp = await fetch(url, options); } catch (e) { say("The server cannot be reached.", true); return false; }
    let data = null;
    try { data = await resp.json(); } catch (e) { /* not JSON */ }
    if (!resp.ok) { say((data && data.error) || `The server answered ${resp.status}.`, true); return false; }
    render(data);
    return true;
  }

  function searchFile(file, box) {
    if (!file) return Promise.resolve(false);
    if (file !== lastFile) {
      lastFile = file;
      queryImg.src = URL.createObjectURL(file);
      region.dataset.id = "";
      region.dataset.w = region.dataset.h = "";
      boxEl.hidden = true;
    }
    querySection.hidden = false;
    const body = new FormData();
    body.append("image", file, file.name || "pasted-image");
    const extra = {
      ...(box ? { box: box.join(",") } : {}),
      ...(typed() ? { text: typed() } : {}),
      ...(copiesBox && copiesBox.checked && !typed() ? { copies: "1" } : {}),
    };
    return call(`/api/search?${params(extra)}`, { method: "POST", body });
  }

  // Region: drag on the query picture; the box is kept in the picture's own pixels.
  function imageSize() {
    const w = Number(region.dataset.w) || queryImg.naturalWidth;
    const h = Number(region.dataset.h) || queryImg.naturalHeight;
    return [w, h];
  }
  function placeBox(x0, y0, x1, y1) {
    const rw = region.clientWidth, rh = region.clientHeight;
    Object.assign(boxEl.style, { left: `${(100 * Math.min(x0, x1)) / rw}%`, top: `${(100 * Math.min(y0, y1)) / rh}%`,
      width: `${(100 * Math.abs(x1 - x0)) / rw}%`, height: `${(100 * Math.abs(y1 - y0)) / rh}%` });
    boxEl.hidden = false;
  }
  let start = null;
  const point = (ev) => {
    const r = region.getBoundingClientRect();
    return [Math.max(0, Math.min(r.width, ev.clientX - r.left)), Math.max(0, Math.min(r.height, ev.clientY - r.top))];
  };
  region.addEventListener("pointerdown", (ev) => { start = point(ev); region.setPointerCapture(ev.pointerId); ev.preventDefault(); });
  region.addEventListener("pointermove", (ev) => { if (start) placeBox(...start, ...point(ev)); });
  region.addEventListener("pointerup", (ev) => {
    if (!start) return;
    const end = point(ev);
    const [x0, y0] = start;
    start = null;
    if (Math.abs(end[0] - x0) < 6 || Math.abs(end[1] - y0) < 6) { boxEl.hidden = true; return; }
    const [w, h] = imageSize();
    const sx = w / region.clientWidth, sy = h / region.clientHeight;
    const box = [Math.min(x0, end[0]) * sx, Math.min(y0, end[1]) * sy, Math.max(x0, end[0]) * sx, Math.max(y0, end[1]) * sy]
      .map((v, i) => Math.round(Math.min(v, i % 2 ? h : w)));
    if (region.dataset.id !== "") {
      location.href = `/?${params({ id: region.dataset.id, box: box.join(",") })}`;
    } else {
      searchFile(lastFile, box);
    }
  });

  // A text alone is a page of its own (/?text=...: a URL to share, the back button works); with a picture, both.
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const file = fileInput.files[0] || lastFile;
    if (file) searchFile(file);
    else if (typed()) location.href = `/?${params({ text: typed() })}`;
    else say(textOn() ? "Choose an image or type what the pictures should show." : "Choose an image.", true);
  });
  // the upload form's copies of the applied filters serve pages without JavaScript; here the fields above rule
  form.querySelectorAll(".within-field").forEach((el) => el.remove());
  // an uploaded picture is searched again within the new filters (a plain GET would drop the upload)
  if (filterForm) filterForm.addEventListener("submit", (ev) => { if (lastFile) { ev.preventDefault(); searchFile(lastFile); } });
  fileInput.addEventListener("change", () => searchFile(fileInput.files[0]));
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (ev) => { ev.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (ev) => { ev.preventDefault(); searchFile(ev.dataTransfer.files[0]); });
  document.addEventListener("paste", (ev) => {
    const item = [...(ev.clipboardData || {}).items || []].find((i) => i.type.startsWith("image/"));
    if (item) { ev.preventDefault(); searchFile(item.getAsFile()); }
  });
  if (indexSel.tagName === "SELECT") indexSel.addEventListener("change", showText);
  showText();
  if (collection && indexSel.tagName === "SELECT") {
    indexSel.addEventListener("change", () => { location.href = `/?${new URLSearchParams({ index: indexSel.value })}`; });
  }
})();
