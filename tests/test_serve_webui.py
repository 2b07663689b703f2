"""The web UI end to end: headless Chromium against the real Serve app (Ingress, Composer, Renderer).

The browser tests share one app served with the ``echo`` engine (the Composer answers with the user's message,
through the same deployment and streaming code): typing a tune makes the answer contain that tune, which the
page draws with abcjs and the real Renderer turns into MIDI/MP3/SVG/PNG. Stop is tested on a second app under
``/slow`` with the real transformers engine on the tiny model, whose 2,048-token answer takes tens of seconds:
it proves the Composer's stream is cancelled, and that the page works under a route prefix.
Every wait is on a page condition, never a sleep. Screenshots at 1280 and 400 px go to ``ARTIFACTS``.
"""

from __future__ import annotations

import base64
import io
import os
import wave
from pathlib import Path

import httpx
import pytest
from conftest import free_port

from chatmusician.prompts import EXAMPLE_PROMPTS
from chatmusician.serve.config import DeploymentOptions, ServeAppConfig
from chatmusician.serve.webui import (
    CPU_MAX_NEW_TOKENS,
    cut_samples,
    midi_to_abc,
    note_to_midi,
    octave_block,
    page_settings,
    samples_abc,
    tune_reports,
)

ARTIFACTS = Path(os.environ.get("CHATMUSICIAN_TEST_ARTIFACTS", "outputs/test-artifacts"))

TUNE = 'X:1\nT:Echo Reel\nM:4/4\nL:1/8\nK:D\n|:"D"d2fd adfd|"G"g2bg "A"a2ga|"D"fdAF D_BA^c|"A"cAeA "D"d4:|'
JIG = "X:2\nT:Second Jig\nM:6/8\nL:1/8\nK:G\n|:GAB dBG|cec BGB|AcA FAd|GBG G3:|"
WALTZ = "X:3\nT:Third Waltz\nM:3/4\nL:1/4\nK:F\nFAc|f2e|dcB|A3|"


# ------------------------------------------------------------------------------------- pure helpers


def test_sample_names_match_abcjs_and_abc_octaves():
    flats = ["C", "Db", "D", "Eb", "E", "F", "Gb", "G", "Ab", "A", "Bb", "B"]  # abcjs's pitch-to-note-name
    for pitch in range(21, 109):
        assert note_to_midi(f"{flats[pitch % 12]}{pitch // 12 - 1}") == pitch
    assert [note_to_midi(n) for n in ("C4", "A0", "C8", "H4", "C", "../x")] == [60, 21, 108, None, None, None]
    assert [midi_to_abc(p) for p in (21, 48, 59, 60, 61, 72, 85, 108)] == [
        "A,,,,", "C,", "B,", "C", "^C", "c", "^c'", "c'''",
    ]  # fmt: skip
    assert list(octave_block(61)) == list(range(60, 72))
    abc = samples_abc(40, range(60, 63))
    assert "%%MIDI program 40" in abc and abc.rstrip().endswith("C2z|^C2z|D2z|")


def test_cut_samples_gives_one_wav_per_slot():
    rate, slots = 8000, 3
    per_slot = int(1.5 * rate)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(
            b"".join(int(i + 1).to_bytes(2, "little", signed=True) * per_slot for i in range(slots))
        )
    pieces = cut_samples(buf.getvalue(), slots)
    assert len(pieces) == slots
    for i, piece in enumerate(pieces):
        with wave.open(io.BytesIO(piece)) as w:
            frames = w.readframes(w.getnframes())
            assert (w.getframerate(), w.getnframes()) == (rate, per_slot)
        assert set(frames[k : k + 2] for k in range(0, len(frames), 2)) == {(i + 1).to_bytes(2, "little")}


def test_tune_reports_every_tune_with_its_issue_lines():
    text = f"Here are two tunes.\n{TUNE}\n\n{JIG.replace('|cec BGB|', '|cec|')}\n"  # bar 2 is half a bar
    report = tune_reports(text)
    assert [t["abc"].splitlines()[1] for t in report["tunes"]] == ["T:Echo Reel", "T:Second Jig"]
    assert report["tunes"][0]["issues"] == []
    bad = [i for i in report["tunes"][1]["issues"] if i["code"] == "bar_duration"]
    assert [(i["line"], i["column"]) for i in bad] == [(6, 11)]  # of the tune's own text, 1-based
    assert tune_reports("no music here")["tunes"] == []


def test_page_settings_size_defaults_to_the_engine():
    cpu = page_settings(ServeAppConfig())
    assert (
        cpu["defaults"]["max_new_tokens"] == CPU_MAX_NEW_TOKENS < ServeAppConfig().generation.max_new_tokens
    )
    gpu = page_settings(ServeAppConfig(composer=DeploymentOptions(num_gpus=1)))
    assert gpu["defaults"]["max_new_tokens"] == ServeAppConfig().generation.max_new_tokens
    assert cpu["examples"] == list(EXAMPLE_PROMPTS) and cpu["model"] == "chatmusician"
    from chatmusician.serve.openai_api import ChatCompletionRequest

    assert cpu["constrained"] == ("constrained" in ChatCompletionRequest.model_fields)


class RenderOnly:
    """A backend whose Renderer synthesises one constant-amplitude slot per pitch (and records its calls)."""

    def __init__(self):
        self.calls = []

    async def render(self, request):
        self.calls.append(request)
        count = request["abc"].count("z")  # one "<note>2z" slot per pitch
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(1000)
            w.writeframes(b"".join(i.to_bytes(2, "little") * 1500 for i in range(count)))
        return {"ok": True, "outputs": {"wav": base64.b64encode(buf.getvalue()).decode()}, "errors": []}


def test_page_routes_without_ray():
    from fastapi.testclient import TestClient

    from chatmusician.serve.ingress import build_api
    from chatmusician.serve.webui import mount_ui

    backend = RenderOnly()
    config = ServeAppConfig(served_model_name="cm-test")
    with TestClient(mount_ui(build_api(backend, config), backend, config), follow_redirects=False) as client:
        assert client.get("/ui").headers["location"] == "/ui/"
        page = client.get("/ui/").text
        assert '"model": "cm-test"' in page and "/ui/static/abcjs-basic-min.js" in page and "{{" not in page
        assert client.get("/ui/static/abcjs-LICENSE.md").text.startswith("Copyright (c) 2009-2026 Paul Rosen")
        found = client.post("/ui/api/analyze", json={"text": f"Two:\n{TUNE}\n\n{JIG}"}).json()
        assert [len(t["abc"]) for t in found["tunes"]] == [len(TUNE), len(JIG)]
        empty = client.post("/ui/api/analyze", json={"text": ""})
        assert empty.status_code == 400 and empty.json()["error"]["code"] == "invalid_request"
        # abcjs asks for Db4: the octave C4..B4 is rendered once, on program 40 (violin), then cut.
        db4 = client.get("/ui/soundfont/violin-mp3/Db4.mp3")
        assert db4.status_code == 200 and db4.headers["content-type"] == "audio/wav"
        with wave.open(io.BytesIO(db4.content)) as w:
            assert w.readframes(w.getnframes()) == (1).to_bytes(2, "little") * 1500  # slot 1 of C4..B4
        assert client.get("/ui/soundfont/violin-mp3/B4.mp3").status_code == 200
        assert len(backend.calls) == 1 and "%%MIDI program 40" in backend.calls[0]["abc"]
        for bad in ("violin-mp3/H4.mp3", "kazoo-mp3/C4.mp3", "violin-mp3/C9.mp3"):
            response = client.get(f"/ui/soundfont/{bad}")
            assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_votes_are_appended_as_preference_pairs_bounded_and_behind_the_key(tmp_path):
    from fastapi.testclient import TestClient

    from chatmusician.prompts import build_chat_prompt
    from chatmusician.serve.ingress import build_api
    from chatmusician.serve.votes import read_votes
    from chatmusician.serve.webui import mount_ui

    path = tmp_path / "votes" / "votes.jsonl"
    config = ServeAppConfig(
        served_model_name="cm-test", votes_path=str(path), votes_max_mb=0.002, api_key="k"
    )
    backend = RenderOnly()
    messages = [
        {"role": "user", "content": "A reel"},
        {"role": "assistant", "content": "X:1 ..."},
        {"role": "user", "content": "Now a jig"},
    ]
    vote = {"messages": messages, "chosen": JIG, "rejected": WALTZ, "params": {"seed": 7, "n": 2}}
    auth = {"Authorization": "Bearer k"}
    with TestClient(mount_ui(build_api(backend, config), backend, config)) as client:
        assert client.post("/ui/api/vote", json=vote).status_code == 401  # the API key covers the vote
        assert client.post("/ui/api/vote", json=vote, headers=auth).json() == {"stored": True}
        same = client.post("/ui/api/vote", json={**vote, "rejected": JIG}, headers=auth)
        assert same.status_code == 400 and same.json()["error"]["code"] == "invalid_vote"
        ends_with_answer = client.post("/ui/api/vote", json={**vote, "messages": messages[:2]}, headers=auth)
        assert ends_with_answer.status_code == 400
        stored = path.read_bytes()
        # ~0.5 KB a vote against a 2 KB bound: the store fills, refuses, and never rewrites what it holds.
        codes = [client.post("/ui/api/vote", json=vote, headers=auth).status_code for _ in range(6)]
        assert 200 in codes and codes[-1] == 507 and codes == sorted(codes)
        assert path.read_bytes().startswith(stored) and path.stat().st_size <= 0.002 * 2**20
    pairs, skipped = read_votes(path)
    assert skipped == 0 and len(pairs) == codes.count(200) + 1
    expected_prompt = build_chat_prompt("Now a jig", [("A reel", "X:1 ...")])
    assert (
        pairs[0]["prompt"] == expected_prompt and pairs[0]["chosen"] == JIG and pairs[0]["rejected"] == WALTZ
    )
    assert pairs[0]["params"] == {"seed": 7, "n": 2} and pairs[0]["model"] == "cm-test"
    with path.open("a") as f:  # a crash mid-line: the reader skips it and keeps the rest
        f.write('{"prompt": "cut sho')
    assert read_votes(path) == (pairs, 1)

    off = ServeAppConfig(votes_path="")
    assert page_settings(off)["votes"] is False
    with TestClient(mount_ui(build_api(backend, off), backend, off)) as client:
        response = client.post("/ui/api/vote", json=vote)
        assert response.status_code == 404 and response.json()["error"]["code"] == "votes_disabled"


# --------------------------------------------------------------------------------------------- the app


def _app(tiny_model_path: str, engine: str, **extra):
    from chatmusician.serve.app import app_config, build_app

    return build_app(
        app_config(
            {
                "model": tiny_model_path,
                "engine": engine,
                "composer": {"num_cpus": 0.1},
                "ingress": {"num_cpus": 0.1},
                "render": {"serve": {"num_cpus": 0.1, "max_replicas": 1}},
                **extra,
            }
        )
    )


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_model_path):
    """Serve on a free port with the echo app at ``/``; yields the base URL."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(_app(tiny_model_path, "echo"), name="chatmusician-ui-test", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def votes_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("votes") / "votes.jsonl"


@pytest.fixture(scope="module")
def slow_ui(server, tiny_model_path, votes_file):
    """The transformers engine on the tiny model, under ``/slow`` (the Stop test needs a long answer, the vote
    test two different sampled takes); its votes go to ``votes_file``."""
    from ray import serve

    app = _app(tiny_model_path, "transformers", votes_path=str(votes_file))
    serve.run(app, name="chatmusician-ui-slow", route_prefix="/slow")
    return f"{server}/slow/ui/"


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1400",
        "--autoplay-policy=no-user-gesture-required",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_script_timeout(90)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, condition, timeout: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def open_page(driver, url: str) -> None:
    driver.set_window_size(1280, 1400)
    driver.get(url)
    wait(driver, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))


def send(driver, text: str) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(text.splitlines()[0])  # typed; the rest goes in like a paste (send_keys is slow on 2 cores)
    driver.execute_script("arguments[0].value = arguments[1];", box, text)
    driver.find_element(By.ID, "send").click()


def cards(driver, root: str = "#chat"):
    return driver.execute_script(f"return [...document.querySelectorAll('{root} .card')];")


# Fetch a URL in the page (blob: URLs too) as base64.
FETCH_B64 = """
const [src, done] = arguments;
fetch(src).then(r => r.arrayBuffer()).then(buf => {
  let s = ''; const b = new Uint8Array(buf);
  for (let i = 0; i < b.length; i += 8192) s += String.fromCharCode(...b.subarray(i, i + 8192));
  done(btoa(s));
}, err => done('error: ' + err));
"""
# Decode with the browser's own audio decoder: proves the file plays.
DECODE_AUDIO = """
const [src, done] = arguments;
fetch(src).then(r => r.arrayBuffer())
  .then(buf => new OfflineAudioContext(1, 1, 22050).decodeAudioData(buf))
  .then(audio => done(audio.duration), err => done('error: ' + err));
"""


def download(driver, card, fmt: str) -> bytes:
    """The bytes behind a card's download link, once it belongs to the card's current version."""
    link = wait(
        driver,
        lambda d: d.execute_script(
            "const [c, f] = arguments; const a = c.querySelector('a.dl-' + f);"
            "return a.href && a.dataset.version === c.dataset.version ? a.href : null;",
            card,
            fmt,
        ),
    )
    data = driver.execute_async_script(FETCH_B64, link)
    assert not data.startswith("error"), data
    return base64.b64decode(data)


def scores(driver, root: str = "#chat") -> list[str | None]:
    """The text of each card's drawn score under ``root`` (None before it is drawn), read in one script: cards
    and their SVGs are replaced on every render, so element handles kept between calls can go stale."""
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0] + ' .card')]"
        ".map(c => { const s = c.querySelector('.score svg'); return s ? s.textContent : null; });",
        root,
    )


def svg_text(card) -> str:
    return card.find_element("css selector", ".score svg").get_attribute("textContent")


@pytest.mark.integration
def test_each_answer_keeps_its_scores_playback_and_downloads(server, browser):
    from selenium.webdriver.common.by import By

    assert httpx.get(f"{server}/healthz").status_code == 200
    open_page(browser, f"{server}/ui/")
    examples = browser.find_elements(By.CSS_SELECTOR, "#examples button")
    assert [e.text for e in examples][3] == " ".join(EXAMPLE_PROMPTS[3].split())  # the original's examples
    switch = browser.find_element(By.ID, "constrained")
    assert switch.is_selected() and switch.is_enabled()  # the API has the field (issue 15): on by default

    message = "Here is my reel:\n" + TUNE
    send(browser, message)
    wait(browser, lambda d: len(scores(d)) == 1 and scores(d)[0])
    answer = browser.find_element(By.CSS_SELECTOR, "#chat pre.answer")
    # Verbatim in a monospaced block: no markdown ate _B, ^c or the bars.
    assert answer.get_attribute("textContent") == message
    assert (
        "_B" in answer.text
        and "^c" in answer.text
        and "monospace" in answer.value_of_css_property("font-family")
    )
    reel = cards(browser)[0]
    # Drawn in the browser from the ABC: the title and one SVG path group per note.
    assert "Echo Reel" in svg_text(reel)
    assert len(reel.find_elements(By.CSS_SELECTOR, ".score svg .abcjs-note")) >= 24  # 27 notes written

    # Play: abcjs's synth (samples cut from the server's soundfont) with notes lit and a line that moves.
    reel.find_element(By.CSS_SELECTOR, ".abcjs-midi-start").click()
    first = wait(browser, lambda d: reel.find_elements(By.CSS_SELECTOR, ".cm-playing") and d.execute_script(
        "const l = arguments[0].querySelector('.cursor-line'); return l && l.getAttribute('x1');", reel))  # fmt: skip
    wait(browser, lambda d: d.execute_script(
        "const l = arguments[0].querySelector('.cursor-line'); return l && l.getAttribute('x1') !== arguments[1];",
        reel, first))  # fmt: skip
    assert not reel.find_element(By.CSS_SELECTOR, ".synth-note").text  # no "playback unavailable" note
    reel.find_element(By.CSS_SELECTOR, ".abcjs-midi-start").click()  # pause

    assert download(browser, reel, "midi")[:4] == b"MThd"
    assert download(browser, reel, "png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in download(browser, reel, "svg")[:2000]
    assert "T:Echo Reel" in download(browser, reel, "abc").decode()
    mp3 = reel.find_element(By.CSS_SELECTOR, "a.dl-mp3").get_attribute("href")
    assert reel.find_element(By.CSS_SELECTOR, "audio").get_attribute("src") == mp3  # the faithful audio
    duration = browser.execute_async_script(DECODE_AUDIO, mp3)
    assert isinstance(duration, float | int) and duration > 8, duration  # 8 bars of reel at 120 bpm: ~17 s

    # A second answer with two tunes: three cards, the first answer's score untouched.
    send(browser, f"Two more:\n{JIG}\n\n{WALTZ}")
    wait(
        browser,
        lambda d: len(scores(d)) == 3 and all(scores(d)),
    )
    assert [svg_text(c).split("Reel")[0] for c in cards(browser)][0].endswith("Echo ")
    assert "Second Jig" in svg_text(cards(browser)[1]) and "Third Waltz" in svg_text(cards(browser)[2])
    answers = browser.find_elements(By.CSS_SELECTOR, "#chat .turn")
    assert [len(t.find_elements(By.CSS_SELECTOR, ".card")) for t in answers] == [1, 2]

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.execute_script("window.scrollTo(0, 0)")
    assert browser.save_screenshot(str(ARTIFACTS / "webui-1280.png"))
    browser.set_window_size(400, 1400)
    wait(browser, lambda d: d.execute_script("return document.documentElement.clientWidth <= 400"))
    # Readable at 400 px: one column, nothing wider than the window.
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    wait(browser, lambda d: d.execute_script(
        "return [...document.querySelectorAll('.score svg')].every(s => s.getBoundingClientRect().width <= 400)"))  # fmt: skip
    assert browser.save_screenshot(str(ARTIFACTS / "webui-400.png"))


@pytest.mark.integration
def test_editor_renders_without_the_composer_marks_issues_and_transposes(server, browser):
    from selenium.webdriver.common.by import By

    open_page(browser, f"{server}/ui/")
    browser.find_element(By.ID, "open-editor").click()
    editor = browser.find_element(By.ID, "abc-input")
    assert browser.switch_to.active_element == editor  # "Render my ABC" leads to the editor, keyboard ready
    browser.execute_script("arguments[0].value = arguments[1];", editor, TUNE)
    browser.find_element(By.ID, "render-abc").click()
    wait(browser, lambda d: "Echo Reel" in ((scores(d, "#editor-card") or [""])[0] or ""))
    assert browser.find_element(By.ID, "editor-status").text == "No issues."

    edited = TUNE.replace("T:Echo Reel", "T:Edited Reel").replace('|"A"cAeA', '|"A"cA|"A"cAeA')  # a short bar
    browser.execute_script("arguments[0].value = arguments[1];", editor, "My tune:\n" + edited)
    browser.find_element(By.ID, "render-abc").click()
    wait(browser, lambda d: "Edited Reel" in ((scores(d, "#editor-card") or [""])[0] or ""))
    # The bar cut short is listed and marked at its line of the editor (line 7: after "My tune:").
    issue = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#abc-issues li"))[0]
    assert "bar_duration" in issue.text and "line 7" in issue.text
    mark = browser.find_element(By.CSS_SELECTOR, "#abc-backdrop mark.warning, #abc-backdrop mark.error")
    assert mark.get_attribute("textContent") == edited.splitlines()[-1]
    assert browser.execute_script("return window.chatmusician.calls").count("/v1/chat/completions") == 0

    # Transpose +2: the score and every download follow; the downloaded ABC's key is E.
    card = cards(browser, "#editor-card")[0]
    before = download(browser, card, "midi")
    up = card.find_element(By.CSS_SELECTOR, "button.up")
    up.click()
    up.send_keys(" ")  # keyboard-usable: Space presses the focused button
    wait(browser, lambda d: card.find_element(By.CSS_SELECTOR, ".shift").text == "+2 semitones")
    abc = download(browser, card, "abc").decode()
    assert "K:E" in abc.splitlines() and "K:D" not in abc.splitlines() and "T:Edited Reel" in abc
    after = download(browser, card, "midi")
    assert after[:4] == b"MThd" and after != before
    assert browser.execute_script("return window.chatmusician.calls").count("/v1/chat/completions") == 0
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "webui-editor-1280.png"))


def _cancelled(app_name: str) -> list[int]:
    """Completion tokens of the requests the app's Composer saw cancelled (its own record, read live)."""
    from ray import serve

    return serve.get_deployment_handle("Composer", app_name=app_name).stats.remote().result()["cancelled"]


@pytest.mark.integration
def test_stop_cancels_the_generation_on_the_server(slow_ui, browser):
    from selenium.webdriver.common.by import By

    open_page(browser, slow_ui)  # under /slow: the page calls /slow/v1/...
    browser.find_element(By.CSS_SELECTOR, "#options summary").click()
    # Seed 0 samples 400+ tokens before any EOS from this prompt (seed 2 stops at 321): Stop comes first.
    for field, value in (("max-new-tokens", "2048"), ("temperature", "1"), ("seed", "0")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)

    # Unconstrained: the grammar cuts a weak model's tune back to its last complete line and ends it early.
    def switched_off(d):
        switch = d.find_element(By.ID, "constrained")
        if switch.is_selected():
            switch.click()
        return not switch.is_selected()

    wait(browser, switched_off)
    send(browser, "Compose a long reel in D")
    wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#chat pre.answer").get_attribute("textContent"))
    stop = browser.find_element(By.ID, "stop")
    assert stop.is_enabled() and not browser.find_element(By.ID, "send").is_enabled()
    stop.click()
    # Seconds, not the tens of seconds the whole answer takes; the page is ready again.
    wait(browser, lambda d: d.find_element(By.ID, "send").is_enabled(), timeout=20)
    assert browser.find_element(By.CSS_SELECTOR, "#chat .state").text == "Stopped."
    # The server stopped the row well before its 2,048 tokens (its batch records the tokens it had generated).
    cancelled = wait(browser, lambda d: _cancelled("chatmusician-ui-slow"), timeout=60)
    assert len(cancelled) == 1 and 0 < cancelled[0] < 2048, cancelled
    assert browser.find_element(By.ID, "regenerate").is_enabled()


@pytest.mark.integration
def test_two_takes_side_by_side_and_the_pick_is_stored_as_a_preference_pair(slow_ui, browser, votes_file):
    from selenium.webdriver.common.by import By

    from chatmusician.prompts import build_chat_prompt
    from chatmusician.serve.votes import read_votes

    open_page(browser, slow_ui)
    browser.find_element(By.CSS_SELECTOR, "#options summary").click()
    for field, value in (("max-new-tokens", "24"), ("temperature", "1"), ("seed", "3")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    two = browser.find_element(By.ID, "two-takes")
    assert two.is_displayed() and not two.is_selected()
    two.click()
    send(browser, "Compose a short jig")
    bar = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#chat .vote-bar"))[0]
    takes = [
        t.get_attribute("textContent")
        for t in browser.find_elements(By.CSS_SELECTOR, "#chat .take pre.answer")
    ]
    assert len(takes) == 2 and all(t.strip() for t in takes) and takes[0] != takes[1]  # seeds 3 and 4
    bar.find_element(By.CSS_SELECTOR, "button.vote-b").click()
    wait(
        browser,
        lambda d: d.find_element(By.CSS_SELECTOR, "#chat .vote-bar").get_attribute("data-voted") == "B",
    )
    assert "preferred" in browser.find_elements(By.CSS_SELECTOR, "#chat .take")[1].get_attribute("class")
    pairs, skipped = read_votes(votes_file)
    assert skipped == 0 and len(pairs) == 1
    assert pairs[0]["prompt"] == build_chat_prompt("Compose a short jig", [])
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == (takes[1], takes[0])
    assert pairs[0]["params"]["seed"] == 3 and pairs[0]["params"]["n"] == 2
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "webui-two-takes.png"))


def test_sample_bank_is_bounded_and_does_not_rerender_a_failed_block_at_once():
    import asyncio

    from chatmusician.serve.webui import SampleBank

    class Failing:
        calls = 0

        async def render(self, request):
            Failing.calls += 1
            return {"ok": False, "outputs": {}, "errors": ["down"]}

    async def scenario():
        bank = SampleBank(Failing(), max_blocks=2, retry_s=3600)
        for _ in range(3):
            with pytest.raises(RuntimeError):
                await bank.sample(40, 61)
        failed_renders = Failing.calls
        for program in (1, 2, 3):
            with pytest.raises(RuntimeError):
                await bank.sample(program, 61)
        return failed_renders, len(bank.blocks)

    assert asyncio.run(scenario()) == (1, 2)
