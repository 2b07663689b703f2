"""Configs of the render pipeline (library, ``chatmusician render`` and the Renderer Serve deployment).

Dataclasses only (no torch/ray imports) so that the CLI's help stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from chatmusician.abc.config import AbcLimits

FORMATS = ("midi", "wav", "mp3", "svg", "png")
"""Every output format the pipeline knows, in the order the stages produce them."""


@dataclass
class SandboxConfig:
    """Limits every external tool runs under (bubblewrap jail + rlimits + a wall-clock timeout)."""

    kind: str = "bwrap"
    """``bwrap``: no network, read-only /usr, only the job directory writable; ``rlimits``: limits only, for
    hosts where user namespaces are off (the tools then see the whole file system: not for untrusted input)."""
    timeout_s: float = 8.0
    """Wall-clock limit of one tool run; the process tree is killed when it passes."""
    cpu_s: int = 8
    """CPU-time limit of one tool run (RLIMIT_CPU)."""
    memory_mb: int = 1024
    """Address-space limit of one tool run (RLIMIT_AS)."""
    file_size_mb: int = 64
    """Largest file one tool may write (RLIMIT_FSIZE); audio files are capped lower by ``max_audio_s``."""
    max_processes: int = 64
    """Process/thread limit inside the jail (RLIMIT_NPROC counts the host user's processes, so keep it loose)."""


@dataclass
class ServeRenderConfig:
    """Resources and autoscaling bounds of the Renderer Serve deployment."""

    num_cpus: float = 0.25
    """Logical CPUs reserved per replica (tools run as subprocesses outside Ray's accounting)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources per replica, e.g. {cpu_node: 0.001} to keep replicas on CPU nodes (cluster.yaml's head has it)."""
    min_replicas: int = 1
    """Autoscaling lower bound."""
    max_replicas: int = 4
    """Autoscaling upper bound."""
    target_ongoing_requests: float = 2.0
    """Autoscaling target of in-flight requests per replica."""
    max_ongoing_requests: int = 4
    """Requests a replica accepts at once (each renders in its own thread)."""
    max_queued_requests: int = 16
    """Requests waiting at each caller beyond that; more are refused (503 + Retry-After) instead of queueing without bound."""
    retry_after_s: int = 1
    """Retry-After seconds of that 503 when the Renderer serves HTTP on its own."""
    route_prefix: str = "/render"
    """HTTP route prefix when the Renderer runs as its own application."""


@dataclass
class RenderConfig:
    """How ABC is rendered: tool options, safety caps and sandbox limits."""

    soundfont: str = "/usr/share/sounds/sf2/TimGM6mb.sf2"
    """General MIDI soundfont for fluidsynth (Debian's timgm6mb-soundfont, 6 MB)."""
    sample_rate: int = 22050
    """Audio sample rate in Hz (WAV and MP3)."""
    gain: float = 1.0
    """fluidsynth master gain (its default 0.2 is very quiet)."""
    reverb_chorus: bool = True
    """fluidsynth's reverb and chorus (off saves ~40 % of its CPU time)."""
    mp3_bitrate_kbps: int = 96
    """Constant MP3 bitrate passed to lame."""
    mp3_quality: int = 7
    """lame's algorithm quality, 0 (best, slowest) to 9; 7 halves encode time against lame's default 5."""
    audio_tail_s: float = 1.0
    """Sound kept after the last note ends (release, reverb); fluidsynth's longer silent-ish tail is cut."""
    max_audio_s: float = 600.0
    """Longest music (from the MIDI's length) that is synthesised to WAV/MP3; longer gives a ``too_long`` error."""
    max_svg_pages: int = 100
    """Most score pages joined into one SVG when a long tune needs abcm2ps's page mode."""
    png_zoom: float = 1.0
    """Scale of the PNG relative to the SVG's size in px."""
    max_png_pixels: int = 40_000_000
    """Largest PNG (width x height); bigger scores are scaled down to fit."""
    sanitize_input: bool = True
    """Pass the input through the ABC sanitizer first (turn off only to test the sandbox alone)."""
    limits: AbcLimits = field(default_factory=AbcLimits)
    """The sanitizer's limits (input size, tunes, bars, voices, tempo, note lengths)."""
    request_timeout_s: float = 9.0
    """Wall-clock budget of one whole render; each tool gets what is left of it (at most ``sandbox.timeout_s``)."""
    parallel_stages: bool = True
    """Run the audio branch (MIDI->WAV->MP3) and the score branch (SVG->PNG) in two threads."""
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    """Limits of every tool run."""
    serve: ServeRenderConfig = field(default_factory=ServeRenderConfig)
    """Renderer deployment resources and autoscaling."""


@dataclass
class RenderCommandConfig:
    """Render one ABC tune (from a file) to MIDI, WAV, MP3, SVG and/or PNG files in a folder."""

    POSITIONAL: ClassVar[str] = "input"  # `chatmusician render tune.abc …`

    input: str
    """ABC file to render (may hold several tunes: see ``tune_index``); ``-`` reads standard input."""
    out: str = "."
    """Folder to write ``<stem>.<ext>`` files and ``<stem>.render.json`` (errors, warnings, timings) into."""
    formats: str = "midi,svg"
    """Comma-separated subset of midi,wav,mp3,svg,png."""
    tune_index: int = 0
    """Which tune of a multi-tune input to render (0 = the first)."""
    render: RenderConfig = field(default_factory=RenderConfig)
    """Pipeline options."""
