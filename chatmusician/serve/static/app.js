// ChatMusician web UI: a chat over /v1/chat/completions (streamed), one score card per tune of each answer
// (abcjs SVG + in-browser synth with a cursor, the server's MP3, transpose, downloads) and an ABC editor that
// renders without the model. No server session: every call is a plain REST request.
"use strict";
(function () {
  const S = JSON.parse(document.getElementById("settings").textContent);
  const $ = (sel, root) => (root || document).querySelector(sel);
  // What the page asked the server, for people debugging and for the browser test ("no Composer call").
  const state = { calls: [], turns: [], busy: null, cards: 0 };
  window.chatmusician = state;

  // With the server's api_key set, the page asks for the key once (on the first 401), keeps it for this tab
  // (sessionStorage) and in a same-site cookie for the soundfont samples abcjs fetches without headers.
  const KEY = "chatmusician_api_key";
  function rememberKey(key) {
    sessionStorage.setItem(KEY, key);
    document.cookie = `${KEY}=${encodeURIComponent(key)}; path=${S.ui}/soundfont; SameSite=Strict`;
  }

  async function api(path, body, signal) {
    state.calls.push(path);
    const send = () => {
      const headers = { "Content-Type": "application/json" };
      const key = sessionStorage.getItem(KEY);
      if (key) headers.Authorization = `Bearer ${key}`;
      return fetch(S.api + path, { method: "POST", headers, body: JSON.stringify(body), signal });
    };
    let response = await send();
    if (response.status === 401) {
      const key = window.prompt("This server needs an API key:");
      if (key) {
        rememberKey(key.trim());
        response = await send();
      }
    }
    return response;
  }

  async function errorText(response) {
    try {
      const body = await response.json();
      return (body.error && body.error.message) || response.statusText;
    } catch (e) {
      return response.statusText || String(response.status);
    }
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v; // never innerHTML: ABC is shown verbatim
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else if (v !== false && v !== null && v !== undefined) node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) if (c) node.append(c);
    return node;
  }

  const b64ToBlob = (b64, type) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    return new Blob([bytes], { type });
  };

  const titleOf = (abc) => ((abc.match(/^T:\s*(.*)$/m) || [])[1] || "").trim();

  // ------------------------------------------------------------------------------------------ score cards

  const MIME = { midi: "audio/midi", mp3: "audio/mpeg", svg: "image/svg+xml", png: "image/png" };
  const EXT = { abc: "abc", midi: "mid", mp3: "mp3", svg: "svg", png: "png" };

  // A cursor for abcjs's synth: colour the sounding notes and draw a line at the current beat.
  function cursorFor(scoreEl) {
    let line = null;
    const clear = () => scoreEl.querySelectorAll(".cm-playing").forEach((e) => e.classList.remove("cm-playing"));
    return {
      beatSubdivisions: 2,
      onStart() {
        const svg = scoreEl.querySelector("svg");
        if (!svg) return;
        line = document.createElementNS("http://www.w3.org/2000/svg", "line");
        line.setAttribute("class", "cursor-line");
        svg.appendChild(line);
      },
      onEvent(ev) {
        if (ev.measureStart && ev.left === null) return;
        clear();
        for (const group of ev.elements || []) for (const note of group) note.classList.add("cm-playing");
        if (line) {
          line.setAttribute("x1", ev.left - 2); line.setAttribute("x2", ev.left - 2);
          line.setAttribute("y1", ev.top); line.setAttribute("y2", ev.top + ev.height);
        }
      },
      onFinished() {
        clear();
        if (line) line.remove();
        line = null;
      },
    };
  }

  function createCard(container, abc, issues, heading) {
    const n = ++state.cards;
    const card = el("article", { class: "card", "data-card": n, "aria-label": heading });
    const score = el("div", { class: "score", role: "img", "aria-label": `Score of ${titleOf(abc) || heading}` });
    const player = el("div", { class: "player abcjs-large", id: `player-${n}` });
    const synthNote = el("p", { class: "note synth-note", role: "status" });
    const audio = el("audio", { controls: true, preload: "none", "aria-label": "Server audio (MP3)" });
    const shift = el("output", { class: "shift", "aria-live": "polite", text: "0 semitones" });
    const links = {};
    const downloads = el("div", { class: "row downloads", role: "group", "aria-label": "Downloads" });
    for (const fmt of ["abc", "midi", "mp3", "svg", "png"]) {
      links[fmt] = el("a", { class: `dl-${fmt}`, "aria-disabled": "true", text: fmt.toUpperCase() });
      downloads.append(links[fmt]);
    }
    const renderNote = el("p", { class: "note render-note", role: "status" });
    const issueList = el("ul", { class: "issues", "aria-label": "Validation issues" });
    const c = { abc, original: abc, semitones: 0, visual: null, originalVisual: null, version: 0, urls: [] };

    const transposeBy = (delta) => {
      c.semitones += delta;
      shift.textContent = `${c.semitones > 0 ? "+" : ""}${c.semitones} semitone${Math.abs(c.semitones) === 1 ? "" : "s"}`;
      // strTranspose rewrites the notes and the K: line of the original text (accidentals kept readable).
      c.abc = c.semitones ? ABCJS.strTranspose(c.original, [c.originalVisual], c.semitones) : c.original;
      draw();
    };
    const editButton = el("button", { type: "button", class: "edit", text: "Edit in the editor",
      onclick: () => openInEditor(c.abc) });
    card.append(
      el("h4", { text: heading + (titleOf(abc) ? ` — ${titleOf(abc)}` : "") }),
      score,
      player,
      synthNote,
      el("div", { class: "row transpose", role: "group", "aria-label": "Transpose" },
        el("span", { text: "Transpose" }),
        el("button", { type: "button", class: "down", "aria-label": "Transpose down a semitone", text: "−",
          onclick: () => transposeBy(-1) }),
        shift,
        el("button", { type: "button", class: "up", "aria-label": "Transpose up a semitone", text: "+",
          onclick: () => transposeBy(1) }),
        editButton),
      el("div", { class: "row" }, audio),
      downloads,
      renderNote,
      issueList,
    );
    container.append(card);
    showIssues(issueList, issues || [], null);

    const synth = new ABCJS.synth.SynthController();
    synth.load(player, cursorFor(score), { displayPlay: true, displayProgress: true, displayWarp: true,
      displayRestart: true });

    function setLink(fmt, blob) {
      const url = URL.createObjectURL(blob);
      c.urls.push(url);
      const a = links[fmt];
      a.href = url;
      a.download = `${(titleOf(c.abc) || "tune").replace(/[^\w-]+/g, "_")}.${EXT[fmt]}`;
      a.setAttribute("aria-disabled", "false");
      a.dataset.version = c.version;
    }

    async function serverRender(version) {
      renderNote.textContent = "Rendering MIDI, MP3, SVG and PNG…";
      let result;
      try {
        const r = await api("/v1/render", { abc: c.abc, formats: ["midi", "mp3", "svg", "png"] });
        result = await r.json();
      } catch (e) {
        renderNote.textContent = `The server could not render this tune (${e}).`;
        return;
      }
      if (version !== c.version) return; // a newer edit or transpose is rendering
      const outputs = result.outputs || {};
      for (const fmt of ["midi", "mp3", "svg", "png"])
        if (outputs[fmt]) setLink(fmt, b64ToBlob(outputs[fmt], MIME[fmt]));
      if (outputs.mp3) audio.src = links.mp3.href;
      const errors = (result.errors || []).map((e) => `${e.code}: ${e.message}`);
      renderNote.textContent = errors.length ? `Render problems: ${errors.join("; ")}` : "";
      card.dataset.rendered = c.version;
    }

    function draw() {
      c.version += 1;
      for (const u of c.urls.splice(0)) URL.revokeObjectURL(u);
      for (const a of Object.values(links)) { a.removeAttribute("href"); a.setAttribute("aria-disabled", "true"); }
      audio.removeAttribute("src");
      setLink("abc", new Blob([c.abc], { type: "text/vnd.abc" }));
      const drawn = ABCJS.renderAbc(score, c.abc, { responsive: "resize", add_classes: true, oneSvgPerLine: false });
      c.visual = drawn[0];
      if (!c.originalVisual) c.originalVisual = c.visual;
      card.dataset.version = c.version;
      // Without Q: abc2midi plays 120 quarter notes a minute (abcjs would pick 180): keep both the same.
      if (c.visual && c.visual.metaText && !c.visual.metaText.tempo)
        c.visual.metaText.tempo = { bpm: 120, duration: [0.25], suppress: true };
      if (ABCJS.synth.supportsAudio()) {
        synth.setTune(c.visual, false, { soundFontUrl: `${S.ui}/soundfont/`, soundFontVolumeMultiplier: 2 }).catch((e) => {
          synthNote.textContent = `In-browser playback is unavailable (${e.message || e}); the MP3 below plays.`;
        });
      } else {
        synthNote.textContent = "This browser cannot play audio itself; use the MP3 below.";
      }
      serverRender(c.version);
    }
    draw();
    return card;
  }

  // -------------------------------------------------------------------------------- validation issues

  function showIssues(list, issues, onPick) {
    list.replaceChildren();
    for (const issue of issues) {
      const where = issue.line ? `line ${issue.line}${issue.column ? `, column ${issue.column}` : ""}` : "";
      const text = `${issue.severity || "issue"} ${issue.code}${where ? ` (${where})` : ""}: ${issue.message}`;
      const item = el("li", { class: issue.severity || "warning" });
      if (onPick && issue.line) item.append(el("button", { type: "button", text, onclick: () => onPick(issue) }));
      else item.textContent = text;
      list.append(item);
    }
  }

  // --------------------------------------------------------------------------------------------- chat

  const chat = $("#chat"), prompt = $("#prompt"), status = $("#status");
  const send = $("#send"), stop = $("#stop"), regenerate = $("#regenerate");

  function num(id) {
    const v = $(id).value.trim();
    return v === "" ? null : Number(v);
  }

  function requestBody(messages) {
    const body = {
      model: S.model, messages, stream: true,
      // An empty field is the demo's default (the OpenAI route's own defaults are OpenAI's).
      temperature: num("#temperature") ?? S.defaults.temperature, top_p: num("#top-p") ?? S.defaults.top_p,
      top_k: num("#top-k") ?? S.defaults.top_k,
      repetition_penalty: num("#repetition-penalty") ?? S.defaults.repetition_penalty,
      max_tokens: num("#max-new-tokens") ?? S.defaults.max_new_tokens,
    };
    if (S.seed && num("#seed") !== null) body.seed = num("#seed");
    if (S.constrained) body.constrained = $("#constrained").checked;
    for (const name of S.constraints || []) {
      const v = $(`#c-${name}`).value.trim();
      if (v && body.constrained) body[name] = v;
    }
    return body;
  }

  function setBusy(controller) {
    state.busy = controller;
    send.disabled = !!controller;
    stop.disabled = !controller;
    regenerate.disabled = !!controller || !state.turns.length;
  }

  // One answer, or with "two takes" two answers side by side (n: 2) and a vote between them.
  async function ask(question, history) {
    const takes = S.votes && $("#two-takes").checked ? 2 : 1;
    const turn = { question, answer: "", answers: Array(takes).fill(""), stopped: false };
    const columns = turn.answers.map((_, i) => ({
      text: el("pre", { class: "text answer" }),
      tunes: el("div", { class: "tunes" }),
      label: takes > 1 ? `Take ${"AB"[i]}` : "",
    }));
    const stateNote = el("p", { class: "state", role: "status" });
    const body = takes > 1
      ? el("div", { class: "takes" }, ...columns.map((c) => el("section", { class: "take", "aria-label": c.label },
        el("h4", { text: c.label }), c.text, c.tunes)))
      : el("div", {}, columns[0].text, columns[0].tunes);
    turn.el = el("div", { class: "turn" },
      el("div", { class: "msg user" }, el("div", { class: "who", text: "You" }), el("pre", { class: "text", text: question })),
      el("div", { class: "msg assistant", "aria-busy": "true" },
        el("div", { class: "who", text: "ChatMusician" }), body, stateNote));
    chat.append(turn.el);
    state.turns.push(turn);
    const controller = new AbortController();
    setBusy(controller);
    status.textContent = "Composing…";
    const messages = [];
    for (const t of history) messages.push({ role: "user", content: t.question }, { role: "assistant", content: t.answer });
    messages.push({ role: "user", content: question });
    const request = requestBody(messages);
    if (takes > 1) request.n = takes; // with a seed, take i uses seed + i
    let paint = 0;
    const show = () => { paint = 0; columns.forEach((c, i) => { c.text.textContent = turn.answers[i]; }); };
    try {
      const response = await api("/v1/chat/completions", request, controller.signal);
      if (!response.ok) throw new Error(await errorText(response));
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") continue;
            const chunk = JSON.parse(data);
            if (chunk.error) throw new Error(chunk.error.message || "the server stopped the answer");
            for (const choice of chunk.choices || []) {
              if (!(choice.delta && choice.delta.content) || !(choice.index < takes)) continue;
              turn.answers[choice.index] += choice.delta.content;
              if (!paint) paint = requestAnimationFrame(show); // one repaint per frame, not per token
            }
          }
        }
      }
      status.textContent = "";
    } catch (e) {
      if (e.name === "AbortError") {
        turn.stopped = true;
        stateNote.textContent = "Stopped.";
        status.textContent = "Stopped: the server cancelled the generation.";
      } else {
        stateNote.textContent = `The answer failed: ${e.message}`;
        status.textContent = `Error: ${e.message}`;
      }
    } finally {
      if (paint) cancelAnimationFrame(paint);
      show();
      turn.answer = turn.answers[0]; // what the next turn's history carries, until a vote picks the other
      turn.el.querySelector(".msg.assistant").setAttribute("aria-busy", "false");
      setBusy(null);
    }
    for (const [i, c] of columns.entries())
      if (turn.answers[i].trim()) await showTunes(turn.answers[i], turn.stopped, c.tunes, stateNote);
    if (takes > 1 && !turn.stopped && turn.answers.every((a) => a.trim())) voteBar(turn, messages, request, columns, stateNote);
  }

  // The user's pick between the two takes, stored by the server as a preference pair.
  function voteBar(turn, messages, request, columns, note) {
    if (turn.answers[0] === turn.answers[1]) { note.textContent = "The two takes are the same: nothing to choose."; return; }
    const params = Object.fromEntries(Object.entries(request).filter(([k]) => !["messages", "stream", "model"].includes(k)));
    const buttons = [0, 1].map((i) => el("button", { type: "button", class: `vote vote-${"ab"[i]}`,
      text: `Take ${"AB"[i]} is better`, onclick: () => vote(i) }));
    const bar = el("div", { class: "row vote-bar", role: "group", "aria-label": "Which take is better?" },
      el("span", { text: "Which take is better?" }), ...buttons);
    turn.el.querySelector(".msg.assistant").append(bar);
    async function vote(i) {
      buttons.forEach((b) => { b.disabled = true; });
      try {
        const r = await api(`${S.ui.slice(S.api.length)}/api/vote`, {
          messages, chosen: turn.answers[i], rejected: turn.answers[1 - i], params });
        if (!r.ok) throw new Error(await errorText(r));
        turn.answer = turn.answers[i];
        columns[i].text.closest(".take").classList.add("preferred");
        note.textContent = `Saved: you preferred take ${"AB"[i]}.`;
        bar.dataset.voted = "ABab"[i];
      } catch (e) {
        note.textContent = `The vote was not saved: ${e.message}`;
        buttons.forEach((b) => { b.disabled = false; });
      }
    }
  }

  async function showTunes(answer, stopped, container, note) {
    try {
      const r = await api(`${S.ui.slice(S.api.length)}/api/analyze`, { text: answer });
      if (!r.ok) throw new Error(await errorText(r));
      const found = await r.json();
      if (!found.tunes.length) {
        if (!stopped) note.textContent = found.message ? `No ABC tune in the answer (${found.message}).` : "No ABC tune in the answer.";
        return;
      }
      found.tunes.forEach((t, i) => createCard(container, t.abc, t.issues, `Tune ${i + 1}`));
    } catch (e) {
      note.textContent = `Could not read the tunes of this answer: ${e.message}`;
    }
  }

  $("#ask").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const question = prompt.value;
    if (state.busy) return;
    if (!question.trim()) { status.textContent = "Type a request first."; prompt.focus(); return; }
    prompt.value = "";
    ask(question, state.turns.slice());
  });
  prompt.addEventListener("keydown", (ev) => { // Ctrl/Cmd+Enter sends; Enter alone is a new line (ABC is multi-line)
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); $("#ask").requestSubmit(); }
  });
  stop.addEventListener("click", () => state.busy && state.busy.abort());
  regenerate.addEventListener("click", () => {
    const last = state.turns.pop();
    if (!last || state.busy) return;
    last.el.remove();
    ask(last.question, state.turns.slice());
  });
  $("#clear").addEventListener("click", () => {
    if (state.busy) state.busy.abort();
    state.turns = [];
    chat.replaceChildren();
    status.textContent = "";
    setBusy(null);
  });

  // ------------------------------------------------------------------------------------------- editor

  const input = $("#abc-input"), backdrop = $("#abc-backdrop");
  const editorStatus = $("#editor-status"), editorIssues = $("#abc-issues"), editorCard = $("#editor-card");

  function openInEditor(abc) {
    input.value = abc;
    highlight([]);
    $("#editor").scrollIntoView({ block: "start" });
    input.focus();
  }

  // Issue lines (and the column) marked in a copy of the text laid exactly under the transparent textarea.
  function highlight(issues) {
    const lines = input.value.split("\n");
    const byLine = new Map();
    for (const i of issues) if (i.line) byLine.set(i.line, i);
    backdrop.replaceChildren();
    lines.forEach((text, k) => {
      const issue = byLine.get(k + 1);
      if (!issue) backdrop.append(text);
      else {
        const mark = el("mark", { class: issue.severity || "warning" });
        const col = issue.column ? Math.min(issue.column - 1, Math.max(text.length - 1, 0)) : -1;
        if (col >= 0 && text.length) {
          mark.append(text.slice(0, col), el("mark", { class: "col", text: text[col] }), text.slice(col + 1));
        } else mark.append(text || " ");
        backdrop.append(mark);
      }
      if (k < lines.length - 1) backdrop.append("\n");
    });
    backdrop.scrollTop = input.scrollTop;
    backdrop.scrollLeft = input.scrollLeft;
  }
  input.addEventListener("scroll", () => { backdrop.scrollTop = input.scrollTop; backdrop.scrollLeft = input.scrollLeft; });
  input.addEventListener("input", () => highlight([]));

  function pick(issue) {
    const lines = input.value.split("\n");
    let start = 0;
    for (let k = 0; k < issue.line - 1 && k < lines.length; k++) start += lines[k].length + 1;
    const col = issue.column ? issue.column - 1 : 0;
    input.focus();
    input.setSelectionRange(start + col, start + Math.max(col + 1, (lines[issue.line - 1] || "").length));
  }

  $("#render-abc").addEventListener("click", async () => {
    const text = input.value;
    if (!text.trim()) { editorStatus.textContent = "Paste or type a tune first."; return; }
    editorStatus.textContent = "Checking…";
    try {
      const r = await api(`${S.ui.slice(S.api.length)}/api/analyze`, { text });
      if (!r.ok) throw new Error(await errorText(r));
      const found = await r.json();
      if (!found.tunes.length) {
        editorStatus.textContent = found.message ? `No ABC tune found (${found.message}).` : "No ABC tune found.";
        showIssues(editorIssues, [], null);
        highlight([]);
        return;
      }
      // Issue lines count from the tune's first line: shift them to the editor's lines.
      const first = found.tunes[0].abc.split("\n")[0];
      const offset = Math.max(0, text.split("\n").findIndex((l) => l.trim() === first.trim()));
      const issues = found.tunes[0].issues.map((i) => ({ ...i, line: i.line ? i.line + offset : i.line }));
      showIssues(editorIssues, issues, pick);
      highlight(issues);
      editorCard.replaceChildren();
      found.tunes.forEach((t, i) => createCard(editorCard, t.abc, [], found.tunes.length > 1 ? `Your tune ${i + 1}` : "Your tune"));
      editorStatus.textContent = issues.length ? `${issues.length} issue(s) found; the score is drawn anyway.` : "No issues.";
    } catch (e) {
      editorStatus.textContent = `Could not check the ABC: ${e.message}`;
    }
  });
  $("#open-editor").addEventListener("click", (ev) => { ev.preventDefault(); openInEditor(input.value); });

  // ------------------------------------------------------------------------------------------ settings

  const d = S.defaults;
  $("#temperature").value = d.temperature; $("#top-p").value = d.top_p; $("#top-k").value = d.top_k;
  $("#repetition-penalty").value = d.repetition_penalty;
  $("#max-new-tokens").value = d.max_new_tokens; $("#max-new-tokens").max = S.max_new_tokens_cap;
  if (!S.constrained) { $("#constrained").disabled = true; $("#constrained-note").hidden = false; }
  const LABELS = { key: ["Key", "D, Gm, Ador…"], meter: ["Meter", "6/8"], unit_length: ["Unit length", "1/8"] };
  for (const name of S.constraints || []) { // the header values constrained decoding fixes, when the API has them
    const at = $("#constrained-note");
    at.before(el("label", { for: `c-${name}`, text: LABELS[name][0] }),
      el("input", { type: "text", id: `c-${name}`, placeholder: LABELS[name][1] }));
  }
  if (!S.seed) $("#seed").disabled = true;
  $("#two-takes-label").hidden = !S.votes;
  for (const example of S.examples) {
    $("#examples").append(el("li", {}, el("button", { type: "button", class: "example", text: example,
      onclick: () => { prompt.value = example; prompt.focus(); } })));
  }
  document.body.dataset.ready = "true"; // the browser test waits on this, not on a sleep
})();
