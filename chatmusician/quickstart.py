"""The main job, end to end on an embedded local Ray: every stage of the platform at toy scale.

tiny LLaMA + tokenizer -> Ray Data tokenize (pt, packed; sft, with a validation split) -> Ray Train + DeepSpeed
full pretraining of the random tiny base -> Ray Tune: a 2-trial LoRA SFT sweep -> LoRA SFT with the winning
values -> merge -> evaluation (MusicTheoryBench fixtures, ABC quality) -> Ray Serve app -> compositions through
its HTTP API (free and grammar-constrained; the parse rate) -> a sandboxed render (MIDI, MP3, SVG, PNG) of a
composed tune -> ``summary.json``, ``loss.png`` and ``quickstart.log`` in ``out_dir``.

Why full pretraining, then LoRA: the tiny base is random, and a low-rank update of random weights learns little;
training every weight on the tunes is what ChatMusician's base got from LLaMA2 and continual pretraining, and
LoRA SFT then teaches the chat form as the original did.

The data are the 1,034 Nottingham tunes: as raw text for pretraining, and as "recreate this header as a score"
instructions for SFT (the paper's text-to-music task). A second run reuses every stage already done
(``stages/*.json``) unless ``force`` is set. The terminal gets one line per stage and per logged step; Ray's,
the workers' and the libraries' own output goes to ``quickstart.log``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatmusician.data.config import SourceConfig, TokenizeConfig
from chatmusician.eval.config import AbcQualityConfig, EvalConfig, MTBConfig, PoolConfig
from chatmusician.train.config import LoraConfig, PretrainConfig, SFTConfig
from chatmusician.tune.config import AshaConfig, SweepConfig

STAGES = 9
APP_NAME = "quickstart"
GENERATED = ("data", "shards", "runs", "sweep", "models", "eval", "render", "stages")
"""The folders of out_dir this job writes (``force`` removes these and nothing else)."""


def _cpu_stage(config_cls, run_name: str, **values):
    """Stage defaults sized for 2 CPU cores (the paper's values live in configs/pretrain.yaml and sft.yaml)."""
    defaults = dict(
        run_name=run_name,
        profile="cpu",
        zero_stage=2,
        num_workers=2,
        cpus_per_worker=0.5,
        global_batch_size=8,
        micro_batch_size=4,
        keep_last=1,
        max_failures=1,
        log_every=10,
    )
    return lambda: config_cls(**{**defaults, **values})


def _sweep_defaults() -> SweepConfig:
    return SweepConfig(
        command="sft",
        overrides={"max_steps": 30, "eval_every": 10, "checkpoint_every": 30, "log_every": 10},
        space={"lr": {"grid": [5e-4, 3e-3]}},
        search="grid",
        num_samples=1,
        asha=AshaConfig(enabled=False),
        name="sweep",
    )


@dataclass
class QuickstartConfig:
    """The main job on one machine: every stage of the platform on the tiny offline model and real ABC tunes."""

    out_dir: str = "./outputs/quickstart"
    """Where data, shards, runs, the sweep, models, eval, renders, summary.json, loss.png and quickstart.log go."""
    force: bool = False
    """Redo every stage (a second run otherwise reuses the stages it finished: out_dir/stages/*.json)."""
    model_size: str = "nano"
    """Tiny model size (nano | micro | small); real runs use configs/pretrain.yaml with a hub id instead."""
    max_tunes: int = 1034
    """How many Nottingham tunes to use (all 1,034 by default)."""
    max_len: int = 512
    """Token block length for packing and training (every stage's max_length); SFT rows longer than this are
    left out rather than cut, so the model only ever learns whole tunes that end (the median tune is ~280 tokens)."""
    val_fraction: float = 0.05
    """Share of the SFT rows held out as the validation split the sweep ranks trials on."""
    pretrain: PretrainConfig = field(
        default_factory=_cpu_stage(
            PretrainConfig,
            "quickstart-pretrain",
            train_type="full",
            lr=3e-3,
            max_steps=300,
            warmup_ratio=0.03,
        )
    )
    """Pretraining of the random tiny base on the raw tunes (model, data, storage_path and max_length are filled in by the job)."""
    sweep: SweepConfig = field(default_factory=_sweep_defaults)
    """Ray Tune sweep of the SFT stage (base and storage_path are filled in by the job); its winning values go to sft."""
    sft: SFTConfig = field(
        default_factory=_cpu_stage(
            SFTConfig,
            "quickstart-sft",
            lora=LoraConfig(r=16, alpha=32, dropout=0.05),
            lr=2e-3,
            max_steps=80,
            eval_every=40,
        )
    )
    """LoRA SFT on the pretrained base (model, data, storage_path and max_length are filled in by the job)."""
    eval: EvalConfig = field(
        default_factory=lambda: EvalConfig(
            mtb=MTBConfig(modes=["ppl_zero_shot", "ppl_few_shot"], bootstrap=200),
            abc_quality=AbcQualityConfig(enabled=True, n_per_prompt=1, max_new_tokens=320),
            pool=PoolConfig(replicas=1, num_cpus=1.0, batch_size=4),
        )
    )
    """Evaluation of the final model (model and output_dir are filled in by the job)."""
    compose_prompts: int = 16
    """Compositions asked of the running app per arm (free and constrained): the parse rate's sample."""
    compose_max_new_tokens: int = 640
    """Token budget of each composition (Nottingham tunes: median ~280 tokens, 95th percentile ~550)."""
    compose_temperature: float = 0.2
    """Sampling temperature of the compositions (the original's default)."""
    parse_goal: float = 0.8
    """Share of free (unconstrained) compositions that should parse; the summary says whether it was met."""
    render_formats: list[str] = field(default_factory=lambda: ["midi", "mp3", "svg", "png"])
    """Formats rendered for the composed tune (or, if none parses, a reference tune, saying so)."""
    num_cpus: int = 4
    """Logical CPUs of the embedded Ray (more than the cores, so Data tasks never starve train workers)."""
    keep_serving: bool = False
    """Leave the API and web UI running at the end until Ctrl-C (default: stop, and print the command that serves)."""
    log_file: str = "quickstart.log"
    """File in out_dir that receives Ray's, the workers' and the libraries' output."""


# ------------------------------------------------------------------ pure helpers


def header_description(tune: str) -> dict[str, str]:
    """The header fields of a tune that the text-to-music task describes (M, L, K, R, T) as label -> value."""
    wanted = {"T": "Title", "M": "Meter", "L": "Note Length", "K": "Key", "R": "Rhythm"}
    found: dict[str, str] = {}
    for line in tune.splitlines():
        m = re.match(r"^([A-Z]):\s*(.*)$", line)
        if m and m.group(1) in wanted and wanted[m.group(1)] not in found and m.group(2).strip():
            found[wanted[m.group(1)]] = m.group(2).strip()
    return found


def write_corpora(tunes: list[str], data_dir: Path) -> tuple[Path, Path]:
    """Nottingham as a pt corpus ({"text"}) and a text-to-music SFT set ({"instruction", "input", "output"})."""
    from chatmusician.prompts import text_to_music

    data_dir.mkdir(parents=True, exist_ok=True)
    pt, sft = data_dir / "pt.jsonl", data_dir / "sft.jsonl"
    with pt.open("w") as f_pt, sft.open("w") as f_sft:
        for i, tune in enumerate(tunes):
            f_pt.write(json.dumps({"text": tune, "src": "nottingham", "id": i}) + "\n")
            row = {"instruction": text_to_music(header_description(tune)), "input": "", "output": tune}
            f_sft.write(json.dumps(row) + "\n")
    return pt, sft


def manifest_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    rows = manifest["rows"]
    return {"rows_read": rows["read"], "rows_rejected": rows["rejected"], "sequences": manifest["sequences"]}


def compose_prompts(tunes: list[str], n: int) -> list[str]:
    """The original's example text-to-music prompt, then descriptions (key, meter, rhythm) of tunes spread over
    the corpus, without titles: the requests a newcomer would type."""
    from chatmusician.prompts import EXAMPLE_PROMPTS, text_to_music

    prompts = [EXAMPLE_PROMPTS[0]]
    step = max(1, len(tunes) // max(1, n))
    for tune in tunes[step // 2 :: step]:
        if len(prompts) >= n:
            break
        d = header_description(tune)
        prompts.append(text_to_music({k: v for k, v in d.items() if k != "Title"}))
    return prompts[:n]


def judge_composition(text: str, midi_ok: bool) -> dict[str, Any]:
    """Parse verdict of one answer: a tune found, no validator error, abc2midi wrote a usable MIDI (eval's metric)."""
    from chatmusician.eval.abc_quality import tune_metrics

    m = tune_metrics(text, midi_ok=midi_ok)
    return {
        "found": m["found"],
        "syntax_ok": m["syntax_ok"],
        "midi_ok": m["midi_ok"],
        "parses": m["parse_success"],
    }


def parse_rate(rows: list[dict[str, Any]]) -> float:
    return sum(bool(r["parses"]) for r in rows) / len(rows) if rows else 0.0


def bar(done: int, total: int, width: int = 24) -> str:
    filled = round(width * done / max(1, total))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def best_values(best: dict[str, Any], space: dict[str, Any]) -> dict[str, Any]:
    """The swept fields' winning values from the sweep's best row."""
    return {k: best[k] for k in space if k in best}


# ------------------------------------------------------------------ console and log


class Console:
    """The person's terminal (the real stdout, saved before fds 1 and 2 go to the log) plus the log file."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def say(self, line: str = "") -> None:
        for out in (self.stream, self.log):
            out.write(line + "\n")
            out.flush()


@contextmanager
def console_and_log(path: Path) -> Iterator[Console]:
    """Send fds 1 and 2 (Ray's worker logs echoed to the driver, DeepSpeed, tqdm bars, Ray's own loggers, child
    processes) to ``path``; yield a Console on the real terminal. Restored on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", buffering=1)  # noqa: SIM115 - closed below
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    try:
        for fd in (1, 2):
            os.dup2(log.fileno(), fd)
        yield Console(terminal, log)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        terminal.close()
        log.close()


def quiet_libraries() -> None:
    """No Ray Data cursor-code bars, no per-step Train result dumps in the log either (the job prints its own)."""
    import logging

    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Train's placement-group cleaner logs a traceback when the State API is briefly unreachable at shutdown.
    for name in ("ray.train.v2._internal.execution.controller.placement_group_cleaner", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)


class StepPrinter:
    """Prints one loss line per logged step of a Train run by following its metrics.jsonl (rank 0 writes every
    step there), so the terminal gets exactly one line per step whatever Ray echoes."""

    def __init__(self, console: Console, label: str, files: Callable[[], list[Path]], total: int, every: int):
        self.console, self.label, self.files, self.total, self.every = console, label, files, total, every
        self.seen: dict[Path, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=10)
        self._poll()

    def _loop(self):
        while not self.stop.wait(1.0):
            self._poll()

    def _poll(self):
        for path in self.files():
            lines = path.read_text().splitlines() if path.exists() else []
            name = path.parent.name
            for line in lines[self.seen.get(path, 0) :]:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line being written: read it next time
                self.seen[path] = self.seen.get(path, 0) + 1
                step = int(row.get("step", 0))
                if "val_loss" in row:
                    self.console.say(f"    {self.label} {name} step {step} val_loss {row['val_loss']:.3f}")
                elif "loss" in row and (step % self.every == 0 or step == self.total or step == 1):
                    self.console.say(
                        f"    {self.label} {bar(step, self.total)} step {step:>4}/{self.total} "
                        f"loss {row['loss']:.3f} lr {row.get('lr', 0):.2e} {row.get('tokens_per_s', 0):.0f} tok/s"
                        + (f" ({name})" if len(self.files()) > 1 else "")
                    )


# ------------------------------------------------------------------ stages


class Stages:
    """Numbered stage headers, timings, and reuse: a finished stage's result is saved in out_dir/stages/."""

    def __init__(self, out: Path, console: Console, summary: dict[str, Any]):
        self.dir, self.console, self.summary, self.n = out / "stages", console, summary, 0
        self.dir.mkdir(parents=True, exist_ok=True)

    def run(self, key: str, title: str, fn: Callable[[], Any]) -> Any:
        self.n += 1
        done = self.dir / f"{key}.json"
        if done.exists():
            result = json.loads(done.read_text())
            self.console.say(f"[{self.n}/{STAGES}] {title}: reused ({done})")
            self.summary["timings_s"][key] = 0.0
            return result
        self.console.say(f"[{self.n}/{STAGES}] {title}")
        t = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t
        self.summary["timings_s"][key] = round(seconds, 1)
        done.write_text(json.dumps(result, indent=2))
        self.console.say(f"      done in {seconds:.0f} s")
        return result


def _tokenize(source: Path, mode: str, tokenizer: str, output_dir: Path, max_len: int, **options) -> dict:
    """One Ray Data tokenize stage into ``output_dir``; returns the manifest's headline counts."""
    from chatmusician.data.pipeline import write_shards

    config = TokenizeConfig(
        sources=[SourceConfig(path=str(source))],
        mode=mode,
        tokenizer=tokenizer,
        max_len=max_len,
        output_dir=str(output_dir),
        **options,
    )
    return manifest_summary(write_shards(config))


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _train(console: Console, label: str, train_cfg, out: Path):
    from chatmusician.train.recipe import train

    metrics = out / "runs" / train_cfg.run_name / "metrics.jsonl"
    with StepPrinter(console, label, lambda: [metrics], train_cfg.max_steps, train_cfg.log_every):
        result = train(train_cfg)
    return Path(result.checkpoint.path), metrics


def pretrain_stage(cfg: QuickstartConfig, console: Console, base: str, out: Path) -> dict:
    """Train the tiny base on the raw tunes (full or LoRA, as configured) and save a loadable model."""
    from chatmusician.model.loading import load_tokenizer
    from chatmusician.model.merge import merge_adapter

    t = cfg.pretrain
    t.model, t.data.shards, t.storage_path = base, str(out / "shards" / "pt"), str(out / "runs")
    t.max_length = cfg.max_len
    checkpoint, metrics = _train(console, "pretrain", t, out)
    target = out / "models" / "pretrained"
    if t.train_type == "full":
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(checkpoint / "model", target)
        load_tokenizer(base).save_pretrained(target)
    else:
        merge_adapter(checkpoint / "adapter", target, base_model=base)
    return {"model": str(target), "checkpoint": str(checkpoint), "metrics": str(metrics)}


def sweep_stage(cfg: QuickstartConfig, console: Console, pretrained: str, out: Path) -> dict:
    """A Ray Tune sweep of the SFT stage from the pretrained model; returns the winning values."""
    from chatmusician.tune import sweep as tune_sweep
    from chatmusician.tune.space import config_yaml

    sft = cfg.sft
    sft.model, sft.data.shards, sft.max_length = pretrained, str(out / "shards" / "sft"), cfg.max_len
    base_yaml = out / "sweep" / "base.yaml"
    base_yaml.parent.mkdir(parents=True, exist_ok=True)
    base_yaml.write_text(config_yaml(sft, "The quickstart's SFT stage: the base of its sweep."))
    s = cfg.sweep
    s.base, s.storage_path = str(base_yaml), str(out)
    root = tune_sweep.sweep_dir(s)
    steps = int(s.overrides.get("max_steps", sft.max_steps))
    every = int(s.overrides.get("log_every", sft.log_every))
    points = ", ".join(f"{k}: {v}" for k, v in s.space.items())
    console.say(f"      {points}; {steps} steps per trial, ranked on the validation loss")
    with StepPrinter(console, "trial", lambda: sorted(root.glob("trials/*/metrics.jsonl")), steps, every):
        result = tune_sweep.run(s)
    best = result["best"]
    values = best_values(best, s.space)
    console.say(
        f"      best: {json.dumps(values)} (val_loss {best['best_val_loss']:.3f}); {root}/results.csv"
    )
    return {"dir": result["dir"], "values": values, "best_val_loss": best["best_val_loss"]}


def sft_stage(cfg: QuickstartConfig, console: Console, pretrained: str, values: dict, out: Path) -> dict:
    """LoRA SFT with the sweep's winning values, then merge into the final model."""
    from chatmusician.model.merge import merge_adapter
    from chatmusician.tune.space import train_config

    sft = cfg.sft
    sft.model, sft.data.shards, sft.storage_path = pretrained, str(out / "shards" / "sft"), str(out / "runs")
    sft.max_length = cfg.max_len
    base_yaml = out / "sweep" / "base.yaml"
    from chatmusician.tune.space import config_yaml

    base_yaml.write_text(config_yaml(sft, "The quickstart's SFT stage: the base of its sweep."))
    tuned = train_config(str(base_yaml), "sft", {}, values)
    console.say(f"      {json.dumps(values)} from the sweep, {tuned.max_steps} steps")
    checkpoint, metrics = _train(console, "sft", tuned, out)
    final = out / "models" / "chatmusician-tiny"
    merge_adapter(checkpoint / "adapter", final, base_model=pretrained)
    return {
        "model": str(final),
        "adapter": str(checkpoint / "adapter"),
        "metrics": str(metrics),
        "values": values,
    }


def eval_stage(cfg: QuickstartConfig, console: Console, model: str, out: Path) -> dict:
    from chatmusician.eval.runner import evaluate

    e = cfg.eval
    e.model, e.output_dir = model, str(out / "eval")
    result = evaluate(e)
    summary: dict[str, Any] = {"dir": e.output_dir}
    for mode, r in (result.get("mtb") or {}).items():
        summary[f"mtb_{mode}"] = r["original"].get("accuracy")  # the original order: OpenCompass's number
    abc = (result.get("abc_quality") or {}).get("all", {})
    summary["abc_parse_success"] = abc.get("parse_success")
    summary["abc_tunes"] = abc.get("tunes")
    mtb = ", ".join(
        f"{k[4:]} {100 * v:.0f} %" for k, v in summary.items() if k.startswith("mtb_") and v is not None
    )
    console.say(f"      MusicTheoryBench fixtures: {mtb} (4 options: chance 25 %)")
    if abc:
        console.say(
            f"      ABC quality: {abc.get('tunes')} tunes over every task family, parse success "
            f"{100 * (abc.get('parse_success') or 0):.0f} %; {e.output_dir}/results.md"
        )
    return summary


def _post(url: str, body: dict[str, Any], timeout: float = 600) -> tuple[int, dict[str, Any]]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _wait_healthy(url: str, deadline_s: float = 300) -> None:
    import urllib.request

    end = time.monotonic() + deadline_s
    while True:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > end:
            raise RuntimeError(f"the app at {url} did not answer /healthz within {deadline_s:.0f} s")
        time.sleep(0.5)


def start_app(model: str) -> str:
    """Deploy the Serve app (Ingress -> Composer, Renderer) on this Ray, HTTP on a free loopback port."""
    from ray import serve

    from chatmusician.ray_local import free_port
    from chatmusician.serve.app import build_app
    from chatmusician.serve.config import DeploymentOptions, ServeAppConfig

    port = free_port()
    config = ServeAppConfig(
        model=model, port=port, composer=DeploymentOptions(num_cpus=1.0, max_ongoing_requests=16)
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(url)
    return url


def compose_stage(cfg: QuickstartConfig, console: Console, url: str, tunes: list[str]) -> dict:
    """Compose through the running app's /v1/compose, free and constrained, all requests at once (the
    Composer batches them); judge each answer as the evaluation does."""
    from concurrent.futures import ThreadPoolExecutor

    from chatmusician.eval.abc_quality import midi_check

    prompts = compose_prompts(tunes, cfg.compose_prompts)
    jobs = [(arm, i, p) for arm in ("free", "constrained") for i, p in enumerate(prompts)]
    done = 0
    lock = threading.Lock()

    def one(job):
        nonlocal done
        arm, i, prompt = job
        params = {
            "max_new_tokens": cfg.compose_max_new_tokens,
            "temperature": cfg.compose_temperature,
            "seed": i,
        }
        body = {"prompt": prompt, "params": params, "formats": [], "constrained": arm == "constrained"}
        status, answer = _post(f"{url}/v1/compose", body)
        text = answer.get("text") or ""
        verdict = judge_composition(text, midi_check(text)) if status == 200 else {"parses": False}
        row = {"arm": arm, "prompt_index": i, "prompt": prompt, "status": status, "text": text,
               "abc": answer.get("abc"), "tokens": (answer.get("usage") or {}).get("completion_tokens"),
               "error": answer.get("error"), **verdict}  # fmt: skip
        with lock:
            done += 1
            console.say(
                f"    compose {bar(done, len(jobs))} {done:>2}/{len(jobs)} {arm:<11} prompt {i + 1}: "
                + ("parses" if row["parses"] else f"does not parse ({_why(row)})")
            )
        return row

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        rows = list(pool.map(one, jobs))
    rates = {arm: parse_rate([r for r in rows if r["arm"] == arm]) for arm in ("free", "constrained")}
    return {"prompts": prompts, "rows": rows, "parse_rate": rates}


def _why(row: dict[str, Any]) -> str:
    if row.get("status") != 200:
        return f"HTTP {row.get('status')}: {(row.get('error') or {}).get('message', '')}"
    if not row.get("found"):
        return "no tune in the answer"
    if not row.get("syntax_ok"):
        return "validator errors"
    return "abc2midi wrote no usable MIDI"


def first_parsing(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The composition to render: a free one that parses first (the model's own music), else a constrained one."""
    for arm in ("free", "constrained"):
        for r in rows:
            if r["arm"] == arm and r["parses"] and r.get("abc"):
                return r
    return None


def render_stage(
    cfg: QuickstartConfig, console: Console, url: str, composed: dict, reference: str, out: Path
) -> dict:
    """Render the chosen tune through the app's /v1/render into out_dir/render (tune.abc beside the renders);
    when no composition parsed, a reference tune, saying which and why."""
    import base64

    chosen = first_parsing(composed["rows"])
    if chosen is not None:
        abc, source = chosen["abc"], f"composed ({chosen['arm']}) for prompt {chosen['prompt_index'] + 1}"
        reason = None
    else:
        abc, source = reference, "reference tune: the first Nottingham tune"
        reason = f"none of the {len(composed['rows'])} compositions parsed"
    status, result = _post(f"{url}/v1/render", {"abc": abc, "formats": cfg.render_formats})
    render_dir = out / "render"
    shutil.rmtree(render_dir, ignore_errors=True)
    render_dir.mkdir(parents=True)
    (render_dir / "tune.abc").write_text(abc.rstrip() + "\n")
    files = {"abc": str(render_dir / "tune.abc")}
    ext = {"midi": "mid"}
    for fmt, data in (result.get("outputs") or {}).items():
        path = render_dir / f"tune.{ext.get(fmt, fmt)}"
        path.write_bytes(base64.b64decode(data))
        files[fmt] = str(path)
    return {"source": source, "fallback_reason": reason, "ok": status == 200 and bool(result.get("ok")),
            "errors": result.get("errors", []), "files": files, "abc": abc}  # fmt: skip


def plot_losses(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5))
    for ax, (name, rows) in zip([axes] if len(curves) == 1 else axes, curves.items(), strict=True):
        train = [r for r in rows if "loss" in r and "val_loss" not in r]
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
        val = [r for r in rows if "val_loss" in r]
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o--", label="validation")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(name)
        ax.legend()
    fig.suptitle("ChatMusician quickstart (tiny model, Nottingham tunes)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ the job


def clean(out: Path) -> None:
    for name in GENERATED:
        shutil.rmtree(out / name, ignore_errors=True)


def run(cfg: QuickstartConfig) -> dict[str, Any]:
    out = Path(cfg.out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.force:
        clean(out)
    log_path = out / cfg.log_file
    with console_and_log(log_path) as console:
        console.say(f"ChatMusician quickstart -> {out} (Ray, worker and library output: {log_path})")
        summary = _run(cfg, out, console)
        summary["log"] = str(log_path)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print_summary(summary, console)
        if cfg.keep_serving and summary.get("api"):
            _serve_forever(console, summary)
    return summary


def _run(cfg: QuickstartConfig, out: Path, console: Console) -> dict[str, Any]:
    import ray
    from ray import serve

    from chatmusician.corpora import nottingham_tunes
    from chatmusician.model.tiny import ensure_tiny

    quiet_libraries()
    summary: dict[str, Any] = {"out_dir": str(out), "timings_s": {}}
    started = time.perf_counter()
    stages = Stages(out, console, summary)
    tunes = nottingham_tunes()[: cfg.max_tunes]

    def model_stage():
        base = str(ensure_tiny(cfg.model_size))
        pt, sft = write_corpora(tunes, out / "data")
        return {"base": base, "pt": str(pt), "sft": str(sft)}

    made = stages.run(
        "model",
        f"tiny LLaMA ({cfg.model_size}) + SentencePiece tokenizer, {len(tunes)} Nottingham tunes",
        model_stage,
    )
    base = made["base"]
    started_ray = summary["started_ray"] = start_ray(cfg.num_cpus)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        summary["pt_manifest"] = stages.run(
            "tokenize_pt", "Ray Data: tokenize + pack the pretraining corpus",
            lambda: _tokenize(Path(made["pt"]), "pt", base, out / "shards" / "pt", cfg.max_len, packing="greedy"),
        )  # fmt: skip
        summary["sft_manifest"] = stages.run(
            "tokenize_sft", f"Ray Data: tokenize the SFT set ({100 * cfg.val_fraction:.0f} % held out for validation)",
            lambda: _tokenize(Path(made["sft"]), "sft", base, out / "shards" / "sft", cfg.max_len,
                              max_source_len=cfg.max_len // 2, sft_truncate=False, val_fraction=cfg.val_fraction),
        )  # fmt: skip
        p = cfg.pretrain
        pre = stages.run(
            "pretrain",
            f"Ray Train + DeepSpeed ZeRO-{p.zero_stage}: {p.train_type} pretraining of the random base, "
            f"{p.max_steps} steps, {p.num_workers} workers, lr {p.lr:g}",
            lambda: pretrain_stage(cfg, console, base, out),
        )
        swept = stages.run(
            "sweep", f"Ray Tune: {_trials(cfg.sweep)}-trial LoRA SFT sweep",
            lambda: sweep_stage(cfg, console, pre["model"], out),
        )  # fmt: skip
        s = cfg.sft
        tuned = stages.run(
            "sft", f"Ray Train: LoRA SFT (r={s.lora.r}) with the sweep's best values, then merge",
            lambda: sft_stage(cfg, console, pre["model"], swept["values"], out),
        )  # fmt: skip
        final = tuned["model"]
        summary["final_model"] = final
        summary["sweep"] = swept
        summary["eval"] = stages.run(
            "eval", "evaluate: MusicTheoryBench fixtures (PPL) + ABC quality, Ray Data batch inference",
            lambda: eval_stage(cfg, console, final, out),
        )  # fmt: skip
        stages.n += 1
        console.say(
            f"[{stages.n}/{STAGES}] Ray Serve: the app (REST + OpenAI API + web UI) on the final model"
        )
        t = time.perf_counter()
        url = start_app(final)
        summary["timings_s"]["serve"] = round(time.perf_counter() - t, 1)
        summary["api"], summary["ui"] = url, f"{url}/ui/"
        console.say(f"      API {url}/docs, web UI {url}/ui/")
        stages.n += 1
        console.say(f"[{stages.n}/{STAGES}] compose through the API, then render")
        t = time.perf_counter()
        composed = compose_stage(cfg, console, url, tunes)
        summary["compose"] = composed
        summary["parse_rate"] = composed["parse_rate"]
        summary["parse_goal"] = cfg.parse_goal
        summary["parse_goal_met"] = composed["parse_rate"]["free"] >= cfg.parse_goal
        summary["render"] = render_stage(cfg, console, url, composed, tunes[0], out)
        summary["timings_s"]["compose_render"] = round(time.perf_counter() - t, 1)
        summary["serving"] = cfg.keep_serving
        if not cfg.keep_serving:
            serve.delete(APP_NAME)
    finally:
        if started_ray and not cfg.keep_serving:
            ray.shutdown()
    curves = {"pretrain": _metrics(Path(pre["metrics"])), "sft": _metrics(Path(tuned["metrics"]))}
    summary["loss"] = {k: [round(r["loss"], 4) for r in v if "loss" in r] for k, v in curves.items()}
    plot_losses(curves, out / "loss.png")
    summary["loss_plot"] = str(out / "loss.png")
    summary["timings_s"]["total"] = round(time.perf_counter() - started, 1)
    return summary


def _trials(s: SweepConfig) -> int:
    if s.search == "grid":
        n = 1
        for spec in s.space.values():
            n *= len(next(iter(spec.values())))
        return n * s.num_samples
    return s.num_samples


def start_ray(num_cpus: int) -> bool:
    """A local Ray for every stage (unless the caller has one), with the dashboard on and its address handed to
    every process: Tune's placement-group cleaner asks the State API, and with no address it guesses among the
    Ray instances on the host (chatmusician.tune.sweep.connect does the same). Returns whether it started Ray."""
    import ray

    from chatmusician.ray_local import free_port, init_local
    from chatmusician.tune.sweep import API_SERVER_ENV

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):  # a running cluster: join it the sweep's way (its dashboard's address)
        from chatmusician.tune.sweep import connect

        return connect()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    os.environ[API_SERVER_ENV] = url
    init_local(
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        log_to_driver=True,  # the workers' output reaches the driver's fds: the log file
        runtime_env={"env_vars": {API_SERVER_ENV: url}},
    )
    return True


def _serve_forever(console: Console, summary: dict[str, Any]) -> None:
    import ray
    from ray import serve

    console.say(f"Serving {summary['api']} (web UI {summary['ui']}) until Ctrl-C.")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(APP_NAME)
        if summary.get("started_ray"):
            ray.shutdown()


def print_summary(summary: dict[str, Any], console: Console) -> None:
    say = console.say
    t = summary["timings_s"]
    say("")
    say("=" * 100)
    for stage in ("pretrain", "sft"):
        losses = summary["loss"][stage]
        if losses:
            say(
                f"{stage:<9} loss {losses[0]:.2f} -> {losses[-1]:.2f} over {len(losses)} steps ({t.get(stage, 0):.0f} s)"
            )
    rate = summary["parse_rate"]
    met = "goal met" if summary["parse_goal_met"] else "goal NOT met"
    say(
        f"parse rate: {100 * rate['free']:.0f} % of free compositions parse ({met}: >= {100 * summary['parse_goal']:.0f} %), "
        f"{100 * rate['constrained']:.0f} % with grammar-constrained decoding"
    )
    r = summary["render"]
    say(f"composed tune ({r['source']}):" if not r["fallback_reason"] else
        f"rendered a fallback, {r['source']}, because {r['fallback_reason']}:")  # fmt: skip
    for line in r["abc"].strip().splitlines():
        say(f"    {line}")
    say(
        f"renders: {Path(r['files']['abc']).parent}/ ({', '.join(sorted(Path(f).name for f in r['files'].values()))})"
    )
    if not r["ok"]:
        say(f"render problems: {json.dumps(r['errors'])[:300]}")
    model = summary["final_model"]
    say(f"final model: {model}")
    if summary.get("serving"):
        say(f"API: {summary['api']}/docs   web UI: {summary['ui']}")
    else:
        say(
            f"the app served on {summary['api']} (web UI {summary['ui']}) during the run; serve it again with:"
        )
    say(f"    chatmusician serve --model {model}        # then open http://127.0.0.1:8000/ui/")
    say(f"    chatmusician chat --model {model}")
    say(
        f"loss curves: {summary['loss_plot']}   sweep: {summary['sweep']['dir']}/results.csv   eval: {summary['eval']['dir']}/results.md"
    )
    say(f"summary: {summary['out_dir']}/summary.json   log (Ray, workers, libraries): {summary['log']}")
    say(f"total {t['total']:.0f} s")
