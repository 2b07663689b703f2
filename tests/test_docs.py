"""The documentation's own promises: every command it shows is one the project accepts (parsed by the CLI's own
parser, never run), every page is one click from the README, and the README stays short."""

from __future__ import annotations

import re
import shlex
from argparse import ArgumentError
from pathlib import Path

import pytest
import yaml

from chatmusician.cli import COMMANDS, build_config

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"```(bash|console|sh)\n(.*?)```", re.S)
INLINE = re.compile(r"`((?:chatmusician|python -m ray_jobs\.|ray job submit)[^`]*)`")
SHELL_VARS = {"$S": "/mnt/shared/chatmusician"}


def shown_commands(text: str) -> list[str]:
    """Commands in bash/console blocks (continuations joined, comments and console output dropped) and in
    inline code that starts with a command."""
    commands = []
    for kind, block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            if kind == "console":
                if not line.startswith("$ "):
                    continue  # output
                line = line[2:]
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#") and "=" not in line.split()[0]:
                commands.append(line)
    commands += [c for c in INLINE.findall(text) if "…" not in c and "|" not in c]
    return commands


def job_command(module: str) -> str:
    """The CLI subcommand a ``ray_jobs.<job>`` entrypoint runs (each calls ``main(["<command>", …])``)."""
    source = (ROOT / "ray_jobs" / f"{module}.py").read_text()
    return re.search(r'main\(\["([\w-]+)"', source).group(1)


def check(command: str) -> None:
    """Raise (with the reason) if the project would not accept ``command``. A bare name in prose (`chatmusician
    render`) is checked as a name; a ``--config`` file the docs' reader writes first (`best.yaml`) is left out."""
    for var, value in SHELL_VARS.items():
        command = command.replace(var, value)
    argv = shlex.split(command)
    if argv[:3] == ["ray", "job", "submit"]:
        argv = argv[argv.index("--") + 1 :] if "--" in argv else []
    if any(arg.startswith("<") and arg.endswith(">") or arg.endswith(".<job>") for arg in argv[:3]):
        return  # a placeholder: `chatmusician <command> --help`, `ray_jobs.<job>`
    if argv[:2] == ["python", "-m"] and argv[2].startswith("ray_jobs."):
        argv = ["chatmusician", job_command(argv[2].removeprefix("ray_jobs.")), *argv[3:]]
    if "--config" in argv and not (ROOT / argv[argv.index("--config") + 1]).is_file():
        del argv[argv.index("--config") : argv.index("--config") + 2]
    if argv[:1] == ["chatmusician"] and argv[1:] != ["--help"]:
        assert argv[1] in COMMANDS, f"no subcommand {argv[1]!r}"
        if len(argv) > 2 and "--help" not in argv:
            build_config(argv[1], argv[2:], exit_on_error=False)
    elif argv[:1] == ["make"]:
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
        assert all(t in targets for t in argv[1:]), f"no make target in {argv[1:]}"
    elif argv[:2] == ["serve", "deploy"]:
        from ray.serve.schema import ServeDeploySchema

        ServeDeploySchema.model_validate(yaml.safe_load((ROOT / argv[2]).read_text()))
    elif argv[:2] == ["ray", "up"]:
        assert (ROOT / argv[2]).is_file()
    elif argv[:2] == ["python", "-m"]:
        assert (ROOT / (argv[2].replace(".", "/") + ".py")).is_file(), f"no module {argv[2]}"
    elif argv[:1] in (["python"], ["bash"]):
        assert (ROOT / argv[1]).is_file(), f"no script {argv[1]}"


ALL = sorted(
    {(page.relative_to(ROOT).as_posix(), c) for page in PAGES for c in shown_commands(page.read_text())}
)


def test_the_docs_show_the_workflows_commands():
    shown = {c.split()[1] for _, c in ALL if c.startswith("chatmusician ")}
    assert set(COMMANDS) - {"quickstart", "build-tiny"} <= shown, set(COMMANDS) - shown


@pytest.mark.parametrize("page,command", ALL, ids=[f"{p}:{c[:60]}" for p, c in ALL])
def test_every_command_shown_is_one_the_project_accepts(page, command):
    check(command)


@pytest.mark.parametrize(
    "wrong",
    [
        "chatmusician sft --lora.rank 8",
        "chatmusician plan --no_such_flag 1",
        "chatmusician compose",
        "make deploy",
    ],
)
def test_a_command_the_project_would_refuse_is_caught(wrong):
    with pytest.raises((AssertionError, ArgumentError)):
        check(wrong)


def test_the_readme_is_short_and_links_every_page_of_the_site():
    readme = (ROOT / "README.md").read_text()
    assert len(readme) < 8000
    site_pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    linked = set(re.findall(r"\]\(docs/([\w/.-]+\.md)\)", readme))
    missing = site_pages - linked - {"index.md"}  # the site's home page is what the README is on GitHub
    assert not missing, f"pages the README does not link: {sorted(missing)}"


def test_the_api_reference_page_is_what_the_app_serves():
    import importlib.util

    spec = importlib.util.spec_from_file_location("api_reference", ROOT / "scripts" / "api_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = (ROOT / "docs" / "serving" / "api.md").read_text()
    assert page == module.render(module._schema())
    assert "## `POST /v1/chat/completions`" in page and "### ChatCompletionRequest" in page
