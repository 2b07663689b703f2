"""``chatmusician chat``: talk to a model in the terminal (the original predict.py), or answer a file of prompts.

Interactive: multi-turn with the original's template, answers streamed as they are generated; commands
``/reset`` (forget the history), ``/examples`` (list the demo's prompts), ``/example N`` (ask example N),
``/quit``. Batch (``--prompts_file``): .txt (one prompt per line), .jsonl or .json (rows with ``prompt`` or
``task: {family, fields}``) -> a JSON list of predictions with the answer, its extracted ABC and validation.
Runs in-process (no Ray): the same engines and validation as the Composer deployment.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from chatmusician.abc.analysis import analyze_abc
from chatmusician.prompts import EXAMPLE_PROMPTS, Task, build_task_prompt
from chatmusician.serve.config import ChatConfig
from chatmusician.serve.engines import load_engine
from chatmusician.serve.requests import resolve_constraints, resolve_params
from chatmusician.serve.types import Completion, ComposeError


def _loads(text: str, path: Path, line: int) -> Any:
    """JSON of one .jsonl line (``line``) or a whole .json file (``line`` 0); ValueError naming the file line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = line or exc.lineno
        raise ValueError(f"{path}:{where}: malformed JSON ({exc.msg}, column {exc.colno})") from None


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a batch file; a row that is neither a prompt nor a valid task -> ValueError naming its line."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip()]
    if path.suffix == ".json":
        rows = _loads(text, path, 0)
        numbered = list(enumerate(rows if isinstance(rows, list) else [rows], 1))
    elif path.suffix == ".jsonl":
        numbered = [(n, _loads(line, path, n)) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    else:
        raise ValueError(f"{path}: use .txt, .json or .jsonl")
    prompts = []
    for n, row in numbered:
        if isinstance(row, str):
            prompts.append(row)
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
            prompts.append(row["prompt"])
        elif isinstance(row, dict) and isinstance(row.get("task"), dict):
            task = row["task"]
            try:
                prompts.append(build_task_prompt(Task(str(task.get("family")), task.get("fields") or {})))
            except ValueError as exc:
                raise ValueError(f"{path}:{n}: {exc}") from None
        else:
            raise ValueError(f"{path}:{n}: a row needs 'prompt' (string) or 'task' ({{family, fields}})")
    return prompts


def prediction(
    prompt: str, completion: Completion | None, error: ComposeError | None = None
) -> dict[str, Any]:
    if error is not None:
        return {"prompt": prompt, "output": None, "error": error.to_dict()}
    abc = analyze_abc(completion.text)
    result = {
        "prompt": prompt,
        "output": completion.text,
        "finish_reason": completion.finish_reason,
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "abc": abc["abc"],
        "validation": abc["validation"],
    }
    if abc["abc"] is None:  # an answer, but no tune in it: say so rather than leave a bare null
        result["error"] = {"code": "no_abc", "message": abc["message"] or "the answer holds no ABC tune"}
    return result


def predict(engine, config: ChatConfig, prompts: Sequence[str]) -> list[dict[str, Any]]:
    """Answer each prompt on its own (no history), ``batch_size`` at a time; a refused prompt gets an error entry."""
    params = resolve_params({"seed": config.seed}, config.generation, config.max_new_tokens_cap)
    constraints = chat_constraints(engine, config)
    results: list[dict[str, Any] | None] = [None] * len(prompts)
    ready = []
    for i, prompt in enumerate(prompts):
        try:
            ready.append((i, dataclasses.replace(engine.prepare(prompt), constraints=constraints)))
        except ComposeError as error:
            results[i] = prediction(prompt, None, error)
    for start in range(0, len(ready), max(1, config.batch_size)):
        chunk = ready[start : start + max(1, config.batch_size)]
        for (i, _), completion in zip(chunk, engine.generate([(p, params) for _, p in chunk]), strict=True):
            results[i] = prediction(prompts[i], completion)
    return results  # type: ignore[return-value]


def chat_constraints(engine, config: ChatConfig):
    """``--constrained`` (+ ``--key/--meter/--unit_length``) -> AbcConstraints | None; a bad value exits clearly."""
    fields = {"key": config.key, "meter": config.meter, "unit_length": config.unit_length}
    try:
        return resolve_constraints(engine, config.constrained or None, fields)
    except ComposeError as error:
        raise SystemExit(f"chatmusician chat: {error.message}") from None


def _print(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()  # answers stream piece by piece


def repl(
    engine, config: ChatConfig, read: Callable[[str], str] = input, write: Callable[[str], Any] = _print
) -> list[tuple[str, str]]:
    """The interactive loop; returns the conversation's (question, answer) turns when the user quits."""
    params = resolve_params({"seed": config.seed}, config.generation, config.max_new_tokens_cap)
    constraints = chat_constraints(engine, config)
    history: list[tuple[str, str]] = []
    write("ChatMusician: ask for music in ABC notation. /examples, /example N, /reset, /quit.\n")
    while True:
        try:
            line = read("Human: ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return history
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return history
        if line == "/reset":
            history = []
            write("(history cleared)\n")
            continue
        if line == "/examples":
            write("".join(f"[{n}] {p}\n" for n, p in enumerate(EXAMPLE_PROMPTS, 1)))
            continue
        if line.startswith("/example"):
            arg = line.removeprefix("/example").strip()
            if not arg.isdigit() or not 1 <= int(arg) <= len(EXAMPLE_PROMPTS):
                write(f"(use /example N with N from 1 to {len(EXAMPLE_PROMPTS)})\n")
                continue
            line = EXAMPLE_PROMPTS[int(arg) - 1]
            write(f"{line}\n")
        try:
            prepared = dataclasses.replace(engine.prepare(line, history), constraints=constraints)
        except ComposeError as error:
            hint = (
                " (/reset clears the history)" if error.code == "context_length_exceeded" and history else ""
            )
            write(f"(refused: {error.message}{hint})\n")
            continue
        write("Assistant: ")
        answer = ""
        for piece in engine.stream(prepared, params):
            if isinstance(piece, str):
                write(piece)
                answer += piece
        write("\n")
        history.append((line, answer))


def run_chat(config: ChatConfig) -> list[dict[str, Any]] | list[tuple[str, str]]:
    """CLI entry: batch mode when ``prompts_file`` is set, else the interactive REPL."""
    if not config.prompts_file:
        return repl(load_engine(config), config)
    prompts = read_prompts(config.prompts_file)  # before loading the model: a bad file fails fast
    results = predict(load_engine(config), config, prompts)
    text = json.dumps(results, indent=2, ensure_ascii=False)
    if config.output:
        Path(config.output).write_text(text + "\n", encoding="utf-8")
        print(f"wrote {len(results)} predictions to {config.output}", file=sys.stderr)
    else:
        print(text)
    return results
