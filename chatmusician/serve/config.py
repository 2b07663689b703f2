"""Configs of serving: the engine (model + adapters + generation defaults and caps), the Serve app, the chat CLI.

Dataclasses only (no torch/ray imports) so that ``chatmusician serve --help`` and ``chat --help`` stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chatmusician.render.config import RenderConfig


@dataclass
class GenerationDefaults:
    """Sampling defaults of the original ChatMusician (predict.py and its gradio demo)."""

    temperature: float = 0.2
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 0.9
    """Nucleus sampling: keep the smallest token set whose probability mass reaches top_p."""
    top_k: int = 40
    """Sample only among the k most likely tokens (0 = no limit)."""
    repetition_penalty: float = 1.1
    """Penalty (>1) on tokens already present in prompt or answer."""
    max_new_tokens: int = 1536
    """Tokens generated at most per answer when the request does not say."""


OPENAI_DEFAULTS = GenerationDefaults(temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0)


@dataclass
class VllmOptions:
    """The ``vllm`` engine's own settings (vLLM's engine arguments of the same names)."""

    python: str = ".venv-vllm/bin/python"
    """Interpreter of the vLLM environment the Composer replica runs in: absolute, or relative to the working
    directory of the command (env CHATMUSICIAN_VLLM_PYTHON overrides); '' = this interpreter (vLLM installed
    beside the package, as on a GPU image)."""
    max_num_seqs: int = 64
    """Sequences vLLM schedules in one step at most (continuous batching)."""
    max_lora_rank: int = 16
    """Largest LoRA rank served (vLLM allocates adapter slots of this rank)."""
    enforce_eager: bool | None = None
    """No CUDA graphs / torch.compile; None = eager on CPU (no graphs there), graphs on CUDA (faster decoding)."""
    engine_process: bool | None = None
    """vLLM's engine core (scheduler and model) in its own process, as `vllm serve` and AsyncLLM run it, off the
    replica's GIL and event loop; None = own process on CUDA, in the replica on CPU (where it starts much faster)."""
    gpu_memory_utilization: float = 0.9
    """Share of the GPU's memory vLLM takes for weights and KV cache (ignored on CPU)."""
    kv_cache_gib: int = 1
    """KV cache size on CPU, GiB (VLLM_CPU_KVCACHE_SPACE)."""
    meter_mask: bool = True
    """Constrained requests: mask bar lines and note lengths by the meter while sampling (a vLLM logits
    processor, chatmusician.serve.engines.vllm_meter); false = check the meter after sampling only."""


@dataclass
class EngineConfig:
    """Which model generates, and the limits every request is checked against."""

    model: str = "m-a-p/ChatMusician"
    """Merged model, or the base model when adapters are given: hub id or local path."""
    adapters: list[str] = field(default_factory=list)
    """LoRA adapters (hub ids or paths) merged into the model in this order, e.g. [pretrain, sft]."""
    lora_adapters: dict[str, str] = field(default_factory=dict)
    """LoRA adapters served beside the model, {name: hub id or path}; a request picks one by model id
    '<served_model_name>:<name>' or '<name>' (batched only with requests of the same adapter)."""
    max_loras: int = 4
    """Adapters kept loaded at once (loaded at start in order, the rest on first use; least recently used unloaded)."""
    tokenizer: str | None = None
    """Tokenizer hub id or path; default: the model's."""
    precision: str = "fp32"
    """Weights dtype: fp32 | bf16 | fp16 (fp16/bf16 only make sense on a GPU)."""
    device: str = "auto"
    """auto (GPU when one is visible, else CPU) | cpu | cuda."""
    engine: str = "transformers"
    """transformers (model.generate) | vllm (vLLM's AsyncLLM, in .venv-vllm) | echo (answers with the user's
    message: a deterministic stand-in for UI tests)."""
    vllm: VllmOptions = field(default_factory=VllmOptions)
    """Settings of the vllm engine."""
    max_prompt_tokens: int = 2048
    """Requests whose templated prompt (history included) is longer are refused: 400 context_length_exceeded."""
    max_new_tokens_cap: int = 2048
    """Largest max_new_tokens a request may ask for."""
    torch_threads: int = 0
    """torch intra-op threads on CPU (0 = torch's default)."""
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    """Sampling defaults of /v1/compose, the web UI and the chat CLI when a request leaves a parameter out."""
    openai_generation: GenerationDefaults = field(default_factory=lambda: OPENAI_DEFAULTS)
    """Defaults of the OpenAI routes (/v1/completions, /v1/chat/completions): OpenAI's, overridden by the model's
    generation_config.json where it sets them (as vLLM's server does)."""


@dataclass
class DeploymentOptions:
    """Resources and queue limits of one Serve deployment (serve_config.yaml's `deployments:` can override)."""

    num_cpus: float = 1.0
    """Logical CPUs per replica (fractions allowed)."""
    num_gpus: float = 0.0
    """GPUs per replica."""
    max_ongoing_requests: int = 16
    """Requests a replica works on at once (the composer batches among these); 0 on the Composer = sized from
    the engine (vllm: 2 x max_num_seqs, so that its batch refills at once; else (concurrent_batches + 1) x
    max_batch_size: the batches generating and the next one assembling)."""
    max_queued_requests: int = 64
    """Requests waiting at each caller beyond that; more are refused with 503 + Retry-After (backpressure)."""


@dataclass
class ServeAppConfig(EngineConfig):
    """The Serve app: Ingress (REST + OpenAI API + web UI) -> Composer (model) and Renderer (ABC -> score/audio)."""

    served_model_name: str = "chatmusician"
    """Model id shown by /v1/models and expected in chat completion requests."""
    max_batch_size: int = 8
    """Dynamic batching: concurrent requests generated together (1 disables batching)."""
    batch_wait_timeout_s: float = 0.05
    """How long the first request of a batch waits for others to join."""
    concurrent_batches: int = 2
    """Batches generated at once (transformers engine): a request arriving while a batch generates starts the
    next batch at once, beside it on the same model, instead of waiting for the running batch's longest answer."""
    stream_interval_s: float = 0.05
    """A stream sends what was generated at most this often (its first piece at once; 0 = every piece as it
    comes): under load fewer, longer events, so the proxy and Ingress spend less per token (vLLM's server makes
    the same trade with its stream interval)."""
    max_body_bytes: int = 1_000_000
    """Larger request bodies are refused with 413."""
    max_prompt_chars: int = 100_000
    """Cheap character cap on prompts and ABC input, checked before tokenizing."""
    default_formats: list[str] = field(default_factory=lambda: ["svg", "midi"])
    """Renders returned by /v1/compose when the request names none (subset of midi, wav, mp3, svg, png)."""
    retry_after_s: int = 1
    """Retry-After seconds sent with 503 when the app is overloaded."""
    max_n: int = 8
    """Largest ``n`` (choices per request) the OpenAI endpoints accept."""
    api_key: str | None = None
    """When set, every /v1 request needs 'Authorization: Bearer <api_key>' (401 without); env CHATMUSICIAN_API_KEY
    is used when this is unset."""
    cors_origins: list[str] = field(default_factory=list)
    """Browser origins allowed to call the API cross-site (CORS), e.g. ['https://app.example.org'] or ['*']."""
    health_probe_idle_s: float = 30.0
    """Serve's health check runs one forward pass when the Composer has answered nothing for this long."""
    web_ui: bool = True
    """Serve the web UI (a static page over this API) at ui_path."""
    ui_path: str = "/ui"
    """URL path of the web UI."""
    votes_path: str = "outputs/votes.jsonl"
    """Where the web UI's "two takes" picks are appended as preference pairs (JSON lines that ``chatmusician prefs``
    reads); on a cluster, a path every Ingress node shares. "" turns voting off."""
    votes_max_mb: float = 64.0
    """Bound on the vote file: once full, new votes are refused (507), old ones are never overwritten."""
    ui_formats: list[str] = field(default_factory=lambda: ["png", "mp3"])
    """Renders the web UI asks for: one image format (png|svg) and one audio format (mp3|wav)."""
    composer: DeploymentOptions = field(
        default_factory=lambda: DeploymentOptions(num_cpus=1.0, max_ongoing_requests=0)
    )
    """Composer deployment (set num_gpus: 1 on GPU nodes)."""
    render: RenderConfig = field(default_factory=RenderConfig)
    """Renderer deployment: tool options, sandbox limits and its CPU pool (``render.serve``)."""
    ingress: DeploymentOptions = field(
        default_factory=lambda: DeploymentOptions(
            num_cpus=0.25, max_ongoing_requests=256, max_queued_requests=256
        )
    )
    """HTTP ingress deployment."""
    host: str = "127.0.0.1"
    """HTTP host for `chatmusician serve` (serve_config.yaml sets its own http_options)."""
    port: int = 8000
    """HTTP port for `chatmusician serve`."""
    app_name: str = "chatmusician"
    """Serve application name for `chatmusician serve`."""


@dataclass
class ChatConfig(EngineConfig):
    """Chat with a model in the terminal (the original predict.py), or answer a file of prompts in batch."""

    prompts_file: str | None = None
    """Batch mode: a .txt (one prompt per line) or .jsonl file ({"prompt": ...} or {"task": {"family", "fields"}})."""
    output: str | None = None
    """Batch mode: where to write the JSON predictions (default: stdout)."""
    batch_size: int = 8
    """Batch mode: prompts generated together."""
    seed: int | None = None
    """Sampling seed (reproducible answers)."""
    constrained: bool = False
    """Grammar-constrained ABC: every answer is a complete tune that parses."""
    key: str | None = None
    """With constrained: the K: value every tune must have (e.g. G, Ador)."""
    meter: str | None = None
    """With constrained: the M: value (e.g. 6/8)."""
    unit_length: str | None = None
    """With constrained: the L: value (e.g. 1/8)."""
