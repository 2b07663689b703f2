"""The gradio web UI (the original demo, on gradio 6): chat with history, the original's example prompts,
advanced sampling options, and for each answer its score image, an audio player and the ABC as a download.

It talks to the same backend as the HTTP routes (Composer stream + Renderer), and is mounted on the ingress's
FastAPI app inside the replica (``gr.mount_gradio_app``).
"""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from chatmusician.prompts import EXAMPLE_PROMPTS
from chatmusician.serve.composer import analyze_abc
from chatmusician.serve.config import ServeAppConfig


def message_text(content: Any) -> str:
    """Text of a gradio chat message's content (a string, or a list of parts in gradio 6)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "")
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return ""


def history_pairs(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Gradio ``messages`` -> closed (question, answer) turns; an unanswered question is dropped."""
    pairs, question = [], None
    for message in messages:
        text = message_text(message.get("content"))
        if message.get("role") == "user":
            question = text if question is None else f"{question}\n{text}"
        elif question is not None:
            pairs.append((question, text))
            question = None
    return pairs


def save_renders(render: dict[str, Any], abc: str, out_dir: Path) -> dict[str, str]:
    """Decode the renderer's base64 outputs (and the ABC) into files the UI components can serve."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"abc": out_dir / "tune.abc"}
    paths["abc"].write_text(abc, encoding="utf-8")
    for fmt, data in (render or {}).get("outputs", {}).items():
        suffix = "mid" if fmt == "midi" else fmt
        paths[fmt] = out_dir / f"tune.{suffix}"
        paths[fmt].write_bytes(base64.b64decode(data))
    return {fmt: str(path) for fmt, path in paths.items()}


def report(abc: dict[str, Any], render: dict[str, Any] | None) -> str:
    """Markdown under the answer: validation findings and render errors, one line each."""
    if not abc["abc"]:
        return (
            f"No ABC tune in the answer ({abc['message']})."
            if abc.get("message")
            else "No ABC tune in the answer."
        )
    lines = [
        f"- {i.get('severity', 'issue')} `{i.get('code')}` line {i.get('line')}: {i.get('message')}"
        for i in abc["validation"]
    ]
    lines += [
        f"- render error `{e.get('code')}`: {e.get('message')}" for e in (render or {}).get("errors", [])
    ]
    return "\n".join(["**Tune found.**" + ("" if lines else " No issues.")] + lines)


def build_ui(backend, config: ServeAppConfig) -> gr.Blocks:
    """The Blocks app over ``backend`` (``stream`` and ``render``, as in :class:`~chatmusician.serve.ingress.Backend`)."""
    defaults = config.generation
    image_format = next((f for f in config.ui_formats if f in ("png", "svg")), None)
    audio_format = next((f for f in config.ui_formats if f in ("mp3", "wav")), None)

    async def respond(message, chat, temperature, top_p, top_k, repetition_penalty, max_new_tokens):
        chat = list(chat or [])
        if not (message or "").strip():
            yield chat, message, None, None, None, "Type a request first."
            return
        history = history_pairs(chat)
        chat += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        yield chat, "", None, None, None, "Composing…"
        params = {
            "temperature": float(temperature),
            "top_p": float(top_p),
            "top_k": int(top_k),
            "repetition_penalty": float(repetition_penalty),
            "max_new_tokens": int(max_new_tokens),
        }
        answer = ""
        try:
            async for event in backend.stream({"prompt": message, "history": history, "params": params}):
                if "error" in event:
                    yield chat, "", None, None, None, f"Refused: {event['error']['message']}"
                    return
                if "delta" in event:
                    answer += event["delta"]
                    chat[-1] = {"role": "assistant", "content": answer}
                    yield chat, "", None, None, None, "Composing…"
        except Exception as exc:  # overload or a dead replica: say so instead of breaking the page
            yield (
                chat,
                "",
                None,
                None,
                None,
                f"The server could not answer ({type(exc).__name__}); try again.",
            )
            return
        abc = analyze_abc(answer)
        if not abc["abc"]:
            yield chat, "", None, None, None, report(abc, None)
            return
        formats = [f for f in (image_format, audio_format) if f]
        try:
            render = await backend.render({"abc": abc["abc"], "formats": formats, "tune_index": 0})
        except Exception as exc:
            render = {"outputs": {}, "errors": [{"code": "renderer_failed", "message": type(exc).__name__}]}
        files = save_renders(render, abc["abc"], Path(tempfile.mkdtemp(prefix="chatmusician-ui-")))
        yield chat, "", files.get(image_format), files.get(audio_format), files["abc"], report(abc, render)

    with gr.Blocks(title="ChatMusician") as ui:
        gr.Markdown(
            "# ChatMusician\nAsk for music in ABC notation; every answer's tune is engraved and played."
        )
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", height=420, elem_id="chat")
                prompt = gr.Textbox(
                    label="Your request", placeholder="Compose a jig in G major…", lines=3, elem_id="prompt"
                )
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear = gr.Button("Clear")
                gr.Examples(examples=[[p] for p in EXAMPLE_PROMPTS], inputs=[prompt], label="Examples")
                with gr.Accordion("Advanced options", open=False):
                    temperature = gr.Slider(
                        0.0, 2.0, value=defaults.temperature, step=0.05, label="Temperature"
                    )
                    top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top p")
                    top_k = gr.Slider(0, 200, value=defaults.top_k, step=1, label="Top k")
                    repetition_penalty = gr.Slider(
                        1.0, 2.0, value=defaults.repetition_penalty, step=0.05, label="Repetition penalty"
                    )
                    max_new_tokens = gr.Slider(
                        1,
                        config.max_new_tokens_cap,
                        value=min(defaults.max_new_tokens, config.max_new_tokens_cap),
                        step=1,
                        label="Max new tokens",
                    )
            with gr.Column(scale=2):
                score = gr.Image(label="Score", type="filepath", elem_id="score", interactive=False)
                audio = gr.Audio(label="Audio", type="filepath", elem_id="audio", interactive=False)
                abc_file = gr.File(label="ABC", elem_id="abc-file", interactive=False)
                status = gr.Markdown(elem_id="status")
        inputs = [prompt, chatbot, temperature, top_p, top_k, repetition_penalty, max_new_tokens]
        outputs = [chatbot, prompt, score, audio, abc_file, status]
        send.click(respond, inputs, outputs)
        prompt.submit(respond, inputs, outputs)
        clear.click(lambda: ([], None, None, None, ""), None, [chatbot, score, audio, abc_file, status])
    # gradio runs one event at a time by default; let several users' requests reach the batching Composer.
    return ui.queue(
        default_concurrency_limit=2 * config.max_batch_size, max_size=config.ingress.max_queued_requests
    )
