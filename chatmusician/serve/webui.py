"""The web UI: one static page (HTML + JS + abcjs, all served by the app) over the app's own REST API.

Why a plain page and not gradio: the page keeps no server-side session (every call is a plain REST request:
``/v1/chat/completions`` streaming, ``/v1/render``), so it works behind any number of Ingress replicas without
sticky sessions; abcjs draws each answer's score as SVG in the browser and plays it with a moving cursor, which
a gradio chat cannot hold per message; and Stop is an aborted fetch, which Serve turns into a cancelled
Composer stream (the stream's ``finally`` stops ``generate``).

Routes added under ``ui_path``: the page (``/``), its files (``/static``), ``POST /api/analyze`` (an answer's
text -> every ABC tune in it and its validation issues with line/column), and ``/soundfont/<instrument>-mp3/
<note>.mp3``: the note samples abcjs's synth fetches, cut from the Renderer's own soundfont (fluidsynth) one
octave per render, so playback in the browser sounds like the server's MP3 and needs no CDN.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import time
import wave
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from chatmusician.abc.analysis import analyze_abc
from chatmusician.prompts import EXAMPLE_PROMPTS, build_chat_prompt
from chatmusician.serve import openai_api as api
from chatmusician.serve.config import ServeAppConfig
from chatmusician.serve.votes import VoteStoreFull, append_vote, vote_record

log = logging.getLogger("ray.serve")
STATIC_DIR = Path(__file__).parent / "static"
GM_INSTRUMENTS: list[str] = json.loads((STATIC_DIR / "gm-instruments.json").read_text())[:128]
"""abcjs's names of the 128 General MIDI programs (from abcjs's instrument-index-to-name.js)."""

CPU_MAX_NEW_TOKENS = 384
"""The page's default answer length when the Composer has no GPU: one short tune, seconds on a CPU."""

SLOT_EIGHTHS = 3  # each sample: a quarter note then an eighth rest at 120 eighths/min (1 s + 0.5 s release)
SLOT_S = SLOT_EIGHTHS * 0.5
_NOTE = re.compile(r"^([A-G])(b?)(-?\d)$")
_PITCH_CLASS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
_ABC_NAMES = ["C", "^C", "D", "^D", "E", "F", "^F", "G", "^G", "A", "^A", "B"]


# ------------------------------------------------------------------------------------------- pure helpers


def note_to_midi(name: str) -> int | None:
    """abcjs's sample name (``C4``, ``Db4``, ``Bb0``) -> MIDI pitch (middle C = 60), None if not a note name."""
    m = _NOTE.match(name)
    if not m:
        return None
    pitch = 12 * (int(m.group(3)) + 1) + _PITCH_CLASS[m.group(1)] - (1 if m.group(2) else 0)
    return pitch if 0 <= pitch <= 127 else None


def midi_to_abc(pitch: int) -> str:
    """MIDI pitch -> ABC note (60 -> ``C``, 72 -> ``c``, 48 -> ``C,``, 85 -> ``^c'``)."""
    octave, name = pitch // 12 - 1, _ABC_NAMES[pitch % 12]
    if octave >= 5:
        return name.lower() + "'" * (octave - 5)
    return name + "," * (4 - octave)


def octave_block(pitch: int) -> range:
    """The 12 pitches rendered together with ``pitch`` (one render per octave of one instrument)."""
    return range(12 * (pitch // 12), 12 * (pitch // 12) + 12)


def samples_abc(program: int, pitches: range) -> str:
    """A tune playing each pitch for 1 s, then 0.5 s of rest for its release, on a General MIDI program."""
    body = "|".join(f"{midi_to_abc(p)}2z" for p in pitches)
    return f"X:1\nT:samples\nM:3/8\nL:1/8\nQ:1/8=120\nK:C\n%%MIDI program {program}\n{body}|\n"


def cut_samples(wav: bytes, count: int) -> list[bytes]:
    """A WAV of ``count`` consecutive 1.5 s slots -> one WAV per slot (browsers decode WAV at any URL)."""
    with wave.open(io.BytesIO(wav)) as src:
        params, frames = src.getparams(), src.readframes(src.getnframes())
    frame_bytes = params.sampwidth * params.nchannels
    per_slot = int(round(SLOT_S * params.framerate))
    out = []
    for i in range(count):
        chunk = frames[i * per_slot * frame_bytes : (i + 1) * per_slot * frame_bytes]
        buf = io.BytesIO()
        with wave.open(buf, "wb") as dst:
            dst.setnchannels(params.nchannels)
            dst.setsampwidth(params.sampwidth)
            dst.setframerate(params.framerate)
            dst.writeframes(chunk)
        out.append(buf.getvalue())
    return out


def tune_reports(text: str) -> dict[str, Any]:
    """Every ABC tune in an answer (or pasted text), each with its validation issues (1-based line/column)."""
    from chatmusician.abc import validate_tune

    found = analyze_abc(text)
    tunes = [
        {
            "abc": tune,
            "issues": [i.to_dict() if hasattr(i, "to_dict") else dict(i) for i in validate_tune(tune)],
        }
        for tune in found["tunes"]
    ]
    return {"tunes": tunes, "message": found["message"], "extraction_issues": found["issues"]}


def page_settings(config: ServeAppConfig) -> dict[str, Any]:
    """What the page needs to know: model name, sampling defaults and caps, which request fields exist."""
    defaults = config.generation
    on_gpu = config.composer.num_gpus > 0 or config.device == "cuda"
    default_tokens = defaults.max_new_tokens if on_gpu else min(defaults.max_new_tokens, CPU_MAX_NEW_TOKENS)
    fields = api.ChatCompletionRequest.model_fields
    return {
        "model": config.served_model_name,
        "examples": list(EXAMPLE_PROMPTS),
        "defaults": {
            "temperature": defaults.temperature,
            "top_p": defaults.top_p,
            "top_k": defaults.top_k,
            "repetition_penalty": defaults.repetition_penalty,
            "max_new_tokens": min(default_tokens, config.max_new_tokens_cap),
        },
        "max_new_tokens_cap": config.max_new_tokens_cap,
        # The constrained-decoding switch appears once the API has the field (issue 15); on by default.
        "constrained": "constrained" in fields,
        "constraints": [name for name in ("key", "meter", "unit_length") if name in fields],
        "seed": "seed" in fields,
        "votes": bool(config.votes_path) and config.max_n >= 2,  # the "two takes" mode
    }


# ----------------------------------------------------------------------------------------------- routes


class AnalyzeBody(BaseModel):
    text: str = Field(min_length=1, description="An answer or pasted ABC: every tune in it is returned.")


class VoteBody(BaseModel):
    messages: list[api.ChatMessage] = Field(min_length=1, description="The conversation both takes answer.")
    chosen: str = Field(min_length=1, description="The take the user picked.")
    rejected: str = Field(min_length=1, description="The other take.")
    params: dict[str, Any] = Field(default_factory=dict, description="The sampling settings of the request.")


class SampleBank:
    """Note samples per (program, octave), rendered through the Renderer and kept in a bounded LRU per Ingress
    replica (~1.6 MB a block: 128 programs x 8 octaves unbounded would be ~1.5 GB); a block whose render failed
    is not rendered again for ``retry_s`` (the Renderer's overload must not multiply)."""

    def __init__(self, backend, max_blocks: int = 48, retry_s: float = 30.0):
        self.backend, self.max_blocks, self.retry_s = backend, max_blocks, retry_s
        self.blocks: OrderedDict[tuple[int, int], asyncio.Task] = OrderedDict()
        self.failed_at: dict[tuple[int, int], float] = {}
        self.renders = 0

    async def _render(self, program: int, block: range) -> dict[int, bytes]:
        self.renders += 1
        pitches = range(max(block.start, 21), min(block.stop, 109))  # the piano's range, as abcjs asks
        result = await self.backend.render({"abc": samples_abc(program, pitches), "formats": ["wav"]})
        wav = (result or {}).get("outputs", {}).get("wav")
        if not wav:
            raise RuntimeError(f"the renderer gave no audio: {(result or {}).get('errors')}")
        return dict(zip(pitches, cut_samples(base64.b64decode(wav), len(pitches)), strict=True))

    async def sample(self, program: int, pitch: int) -> bytes | None:
        block = octave_block(pitch)
        key = (program, block.start)
        task = self.blocks.get(key)
        failed = task is not None and task.done() and task.exception() is not None
        if failed and time.monotonic() - self.failed_at.setdefault(key, time.monotonic()) >= self.retry_s:
            task = None  # retry a failed block only after a while
        if task is None:
            task = self.blocks[key] = asyncio.ensure_future(self._render(program, block))
            self.failed_at.pop(key, None)
            while len(self.blocks) > self.max_blocks:  # least recently used first
                old, _ = self.blocks.popitem(last=False)
                self.failed_at.pop(old, None)
        self.blocks.move_to_end(key)
        return (await task).get(pitch)


def mount_ui(app: FastAPI, backend, config: ServeAppConfig) -> FastAPI:
    """Add the page and its routes under ``config.ui_path`` to the API app (``backend`` as in the ingress)."""
    base = "/" + config.ui_path.strip("/")
    settings = page_settings(config)
    name = config.served_model_name
    template = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    bank = SampleBank(backend)

    @app.get(base, include_in_schema=False)
    async def ui_redirect(request: Request):
        return RedirectResponse(request.scope.get("root_path", "") + base + "/")

    @app.get(base + "/", include_in_schema=False)
    async def ui_page(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        page = {**settings, "api": root, "ui": root + base}
        # "</" cannot end the script element early once escaped; the page reads it with JSON.parse.
        blob = json.dumps(page).replace("</", "<\\/")
        return HTMLResponse(template.replace("{{SETTINGS}}", blob).replace("{{UI}}", root + base))

    def error(status: int, code: str, message: str) -> JSONResponse:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        return JSONResponse(api.error_body(code, message, kind), status_code=status)

    @app.post(base + "/api/analyze", tags=["music"])
    async def ui_analyze(body: AnalyzeBody) -> Any:
        """Every ABC tune in a text with its validation issues (the page's per-answer score cards)."""
        if len(body.text) > config.max_prompt_chars:
            return error(413, "input_too_long", f"the text is over {config.max_prompt_chars} characters")
        return await asyncio.to_thread(tune_reports, body.text)

    @app.post(base + "/api/vote", tags=["music"])
    async def ui_vote(body: VoteBody) -> Any:
        """Store the user's pick between two takes as a preference pair (the prompt as the model saw it)."""
        if not config.votes_path:
            return error(404, "votes_disabled", "this server does not store votes (votes_path is empty)")
        texts = [body.chosen, body.rejected, *(api.content_text(m.content) for m in body.messages)]
        if sum(map(len, texts)) > config.max_prompt_chars:
            return error(413, "input_too_long", f"the vote is over {config.max_prompt_chars} characters")
        try:
            question, history = api.messages_to_turns(body.messages)
            record = vote_record(
                build_chat_prompt(question, history), body.chosen, body.rejected, name, body.params
            )
        except ValueError as exc:
            return error(400, "invalid_vote", str(exc))
        try:
            await asyncio.to_thread(append_vote, config.votes_path, record, int(config.votes_max_mb * 2**20))
        except VoteStoreFull as exc:
            log.warning("%s", exc)
            return error(507, "votes_full", "the vote store is full; ask the operator to move it")
        return {"stored": True}

    @app.get(base + "/soundfont/{instrument}-mp3/{note}.mp3", include_in_schema=False)
    async def ui_sample(instrument: str, note: str) -> Response:
        pitch = note_to_midi(note)
        if instrument not in GM_INSTRUMENTS or pitch is None or not 21 <= pitch <= 108:
            return error(404, "not_found", f"no sample {instrument}/{note}")
        try:
            data = await bank.sample(GM_INSTRUMENTS.index(instrument), pitch)
        except Exception as exc:  # abcjs then names the note it could not load; the server's MP3 still plays
            log.warning("sample %s/%s failed", instrument, note, exc_info=exc)
            return error(503, "sample_failed", "the sample could not be rendered")
        return Response(data, media_type="audio/wav", headers={"Cache-Control": "public, max-age=86400"})

    app.mount(base + "/static", StaticFiles(directory=STATIC_DIR), name="ui-static")
    return app
