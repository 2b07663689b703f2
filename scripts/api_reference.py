"""``docs/serving/api.md`` from the app's own OpenAPI schema (the FastAPI app is built over no backend: only its
schema is read). ``python scripts/api_reference.py`` rewrites the page; ``--check`` (what ``make docs`` runs) exits 1
when the page is not what the routes say."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

PAGE = Path(__file__).resolve().parents[1] / "docs" / "serving" / "api.md"


def _schema() -> dict[str, Any]:
    from chatmusician.serve.config import ServeAppConfig
    from chatmusician.serve.ingress import build_api

    return build_api(None, ServeAppConfig()).openapi()


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _type_of(prop: dict[str, Any]) -> str:
    if "$ref" in prop:
        return f"[{_ref_name(prop['$ref'])}](#{_ref_name(prop['$ref']).lower()})"
    if "anyOf" in prop:
        return " or ".join(_type_of(p) for p in prop["anyOf"])
    if prop.get("type") == "array":
        return f"array of {_type_of(prop.get('items', {}))}"
    if "enum" in prop:
        return " / ".join(f"`{v}`" for v in prop["enum"])
    return prop.get("type", "any")


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def render(schema: dict[str, Any]) -> str:
    out = [
        "# API reference",
        "",
        "Generated from the app's OpenAPI schema by `python scripts/api_reference.py` (the running app serves the same schema at",
        "`/openapi.json`, with Swagger UI at `/docs`). With `api_key` set, every route but `/healthz` needs",
        "`Authorization: Bearer <key>`. The web UI's own routes (`/ui/api/*`) are not listed: they serve the page.",
        "",
    ]
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            out += [
                f"## `{method.upper()} {path}`",
                "",
                (op.get("description") or op.get("summary", "")).strip(),
                "",
            ]
            params = op.get("parameters", [])
            if params:
                out += ["| parameter | in | type |", "|---|---|---|"]
                out += [f"| `{p['name']}` | {p['in']} | {_type_of(p.get('schema', {}))} |" for p in params]
                out.append("")
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body:
                out += [f"Request body: {_type_of(body)}", ""]
    out += ["## Schemas", ""]
    for name, spec in schema.get("components", {}).get("schemas", {}).items():
        out += [f"### {name}", ""]
        if spec.get("description"):
            out += [_cell(spec["description"]), ""]
        props = spec.get("properties", {})
        if props:
            required = set(spec.get("required", []))
            out += ["| field | type | default | description |", "|---|---|---|---|"]
            for field, prop in props.items():
                default = "required" if field in required else json.dumps(prop.get("default"))
                out.append(
                    f"| `{field}` | {_cell(_type_of(prop))} | {_cell(default)} | {_cell(prop.get('description', ''))} |"
                )
            out.append("")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    page = render(_schema())
    if "--check" in argv:
        if PAGE.exists() and PAGE.read_text() == page:
            return 0
        print(
            f"{PAGE.name} is out of date with the app's routes: run python scripts/api_reference.py",
            file=sys.stderr,
        )
        return 1
    PAGE.write_text(page)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
