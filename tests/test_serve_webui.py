"""The gradio web UI end to end: headless Chromium types a request, gets a score image and playable audio.

A random tiny model writes no ABC, so this module serves the app with the ``echo`` engine (the Composer answers
with the user's message, through the same deployment, streaming and batching code): typing a tune makes the
answer contain that tune, which the real Renderer engraves (PNG) and synthesises (MP3).
"""

from __future__ import annotations

import httpx
import pytest
from conftest import free_port

from chatmusician.prompts import EXAMPLE_PROMPTS
from chatmusician.serve.webui import history_pairs, message_text, report

TUNE = 'X:1\nT:Echo Reel\nM:4/4\nL:1/8\nK:D\n|:"D"d2fd adfd|"G"g2bg "A"a2ga|"D"fdAF DFAd|"A"cAeA "D"d4:|'


def test_history_pairs_and_message_text():
    chat = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": [{"type": "text", "text": "a1"}]},
        {"role": "user", "content": "q2"},
    ]
    assert history_pairs(chat) == [("q1", "a1")]
    assert message_text([{"text": "a"}, "b"]) == "ab"
    no_tune = {"abc": None, "message": "no ABC found", "validation": []}
    assert "No ABC" in report(no_tune, None)
    issue = {"severity": "warning", "code": "bar_duration", "line": 3, "message": "short bar"}
    text = report(
        {"abc": "X:1", "validation": [issue]}, {"errors": [{"code": "too_long", "message": "long"}]}
    )
    assert "bar_duration" in text and "too_long" in text


@pytest.fixture(scope="module")
def ui_url(ray_cluster, tiny_model_path):
    from ray import serve

    from chatmusician.serve.app import app_config, build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = app_config(
        {
            "model": tiny_model_path,
            "engine": "echo",
            "ui_formats": ["png", "mp3"],
            "composer": {"num_cpus": 0.1},
            "ingress": {"num_cpus": 0.1},
            "render": {"serve": {"num_cpus": 0.1, "max_replicas": 1}},
        }
    )
    try:
        serve.run(build_app(config), name="chatmusician-ui-test", route_prefix="/")
        yield f"http://127.0.0.1:{port}/ui/"
    finally:
        serve.shutdown()


@pytest.fixture()
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
        "--window-size=1400,1800",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        yield driver
    finally:
        driver.quit()


# Fetch a URL in the page and decode it with the browser's own audio decoder: proves the file plays.
DECODE_AUDIO = """
const [src, done] = arguments;
fetch(src).then(r => r.arrayBuffer())
  .then(buf => new OfflineAudioContext(1, 1, 22050).decodeAudioData(buf))
  .then(audio => done(audio.duration), err => done('error: ' + err));
"""


@pytest.mark.integration
def test_web_ui_chat_gives_a_score_image_and_playable_audio(ui_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    assert httpx.get(ui_url.replace("/ui/", "/healthz")).status_code == 200
    browser.get(ui_url)
    wait = WebDriverWait(browser, 120)
    box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
    assert EXAMPLE_PROMPTS[3] in browser.page_source  # the original's examples are offered
    box.send_keys(TUNE.splitlines()[0])  # typed; the whole multi-line tune then goes in like a paste
    browser.execute_script(
        "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input', {bubbles: true}));",
        box,
        TUNE,
    )
    browser.find_element(By.CSS_SELECTOR, "#send").click()

    image = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#score img")))
    wait.until(lambda d: image.get_attribute("naturalWidth") not in (None, "0"))
    assert int(image.get_attribute("naturalWidth")) > 200  # an engraved score, not an icon
    assert "Echo Reel" in browser.find_element(By.CSS_SELECTOR, "#chat").text  # the answer is in the chat

    audio_src = wait.until(
        lambda d: d.execute_script(
            "const a = document.querySelector('#audio audio');"
            "if (a && a.src) return a.src;"
            "const l = [...document.querySelectorAll('#audio a[href], #audio [src]')].map(e => e.href || e.src);"
            "return l.find(u => u && u.includes('.mp3')) || null;"
        )
    )
    browser.set_script_timeout(60)
    duration = browser.execute_async_script(DECODE_AUDIO, audio_src)
    assert isinstance(duration, float | int) and duration > 2, duration  # 8 bars of reel: seconds of music

    link = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#abc-file a[href]")))
    abc = httpx.get(link.get_attribute("href")).text
    assert "T:Echo Reel" in abc and "K:D" in abc
