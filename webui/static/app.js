// Progressive enhancement of the plain form: search without reloading, drag-and-drop, paste, "more like this".
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
  const indexSel = document.getElementById("index");
  const kSel = document.getElementById("k");

  const say = (text, isError) => { status.textContent = text; status.className = isError ? "error" : ""; };
  const params = (extra) => new URLSearchParams({ k: kSel.value, index: indexSel.value, ...extra });

  function render(data) {
    grid.replaceChildren();
    for (const r of data.results) {
      const li = document.createElement("li");
      li.className = `card ${r.similarity}`;
      li.dataset.id = r.id;
      li.innerHTML = `<a class="more" href="/?id=${r.id}&index=${encodeURIComponent(data.index)}&k=${data.k}" title="more like this"><img alt=""></a>
        <div class="caption"><span class="rank">#${r.rank}</span><span class="score"></span>
        <span class="path"></span><a class="open" target="_blank" rel="noopener">open</a></div>`;
      li.querySelector("img").src = r.thumbnail_url;
      li.querySelector("img").alt = r.path;
      li.querySelector(".score").textContent = `${r.score.toFixed(3)} · ${r.similarity}`;
      li.querySelector(".path").textContent = r.path;
      li.querySelector(".path").title = r.path;
      li.querySelector(".open").href = r.image_url;
      li.querySelector("a.more").addEventListener("click", (ev) => { ev.preventDefault(); searchId(r.id, r.thumbnail_url); });
      grid.appendChild(li);
    }
    title.textContent = `Top ${data.results.length} in ${data.index} (${data.encoder}, ${Math.round(data.took_ms)} ms)`;
    section.hidden = false;
    say("");
  }

  async function call(url, options) {
    say("Searching…");
    let resp;
    try { resp = await fetch(url, options); } catch (e) { say("The server cannot be reached.", true); return; }
    let data = null;
    try { data = await resp.json(); } catch (e) { /* not JSON */ }
    if (!resp.ok) { say((data && data.error) || `The server answered ${resp.status}.`, true); return; }
    render(data);
  }

  function searchFile(file) {
    if (!file) return;
    queryImg.src = URL.createObjectURL(file);
    querySection.hidden = false;
    const body = new FormData();
    body.append("image", file, file.name || "pasted-image");
    call(`/api/search?${params()}`, { method: "POST", body });
  }

  function searchId(id, thumb) {
    fileInput.value = "";
    queryImg.src = thumb;
    querySection.hidden = false;
    history.replaceState(null, "", `/?${params({ id })}`);
    call(`/api/search?${params({ id })}`);
  }

  form.addEventListener("submit", (ev) => { ev.preventDefault(); searchFile(fileInput.files[0]); });
  fileInput.addEventListener("change", () => searchFile(fileInput.files[0]));
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (ev) => { ev.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (ev) => { ev.preventDefault(); searchFile(ev.dataTransfer.files[0]); });
  document.addEventListener("paste", (ev) => {
    const item = [...(ev.clipboardData || {}).items || []].find((i) => i.type.startsWith("image/"));
    if (item) { ev.preventDefault(); searchFile(item.getAsFile()); }
  });
  for (const a of grid.querySelectorAll("a.more")) {
    a.addEventListener("click", (ev) => {
      ev.preventDefault();
      const li = a.closest("li");
      searchId(li.dataset.id, a.querySelector("img").src);
    });
  }
})();
