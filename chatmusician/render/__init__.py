"""ABC → MIDI, WAV, MP3 (audio) and SVG, PNG (score), every tool sandboxed: a library call, the
``chatmusician render`` command and the Renderer Serve deployment (:mod:`chatmusician.render.deployment`,
imported on its own so that the library needs no Ray).
"""

from chatmusician.render.config import (
    FORMATS,
    RenderCommandConfig,
    RenderConfig,
    SandboxConfig,
    ServeRenderConfig,
)
from chatmusician.render.pipeline import RenderRequest, RenderResult, render, render_dict

__all__ = [
    "FORMATS",
    "RenderCommandConfig",
    "RenderConfig",
    "RenderRequest",
    "RenderResult",
    "SandboxConfig",
    "ServeRenderConfig",
    "render",
    "render_dict",
]
