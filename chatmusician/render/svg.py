"""Make abcm2ps's SVG safe to show in a browser, and join page-mode SVGs into one.

abcm2ps copies ``%%beginsvg`` blocks verbatim, ``<script>`` included (docs/TOOLS.md), so whatever the ABC sanitizer
missed must not survive here. An allowlist: only drawing elements of the SVG namespace, no ``on*`` handlers,
links only to ``#fragments`` inside the document, no CSS that loads anything. XML is parsed with defusedxml
(no entity expansion, no external entities).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from defusedxml.ElementTree import fromstring

SVG_NS = "http://www.w3.org/2000/svg"
XLINK_NS = "http://www.w3.org/1999/xlink"
XML_NS = "http://www.w3.org/XML/1998/namespace"
ET.register_namespace("", SVG_NS)
ET.register_namespace("xlink", XLINK_NS)

ALLOWED_ELEMENTS = frozenset(
    "svg g defs symbol use path rect circle ellipse line polyline polygon text tspan title desc style "
    "linearGradient radialGradient stop clipPath mask pattern marker".split()
)
_HREFS = {"href", f"{{{XLINK_NS}}}href"}
# CSS that fetches or runs something: @import, url(...) to anything but a #fragment, old IE expression().
_UNSAFE_CSS = re.compile(r"@import|expression\s*\(|url\s*\(\s*['\"]?\s*(?!#)", re.IGNORECASE)
_LENGTH = re.compile(r"^\s*([0-9.]+)\s*(px)?\s*$")


class SvgError(ValueError):
    """The tool's SVG is not well-formed XML, or is not an SVG document."""


@dataclass
class CleanSvg:
    svg: str
    removed: list[str] = field(default_factory=list)
    """What was taken out (e.g. ``element script``, ``attribute onload``), for a warning."""


def _local(tag: str) -> tuple[str | None, str]:
    if tag.startswith("{"):
        ns, _, name = tag[1:].partition("}")
        return ns, name
    return None, tag


def _clean_attributes(el: ET.Element, removed: list[str]) -> None:
    for name in list(el.attrib):
        ns, local = _local(name)
        value = el.attrib[name]
        if name in _HREFS:
            safe = value.strip().startswith("#")
        elif ns not in (None, XML_NS):
            safe = False
        else:
            lowered = local.lower()
            safe = not lowered.startswith("on") and "javascript:" not in value.lower()
            if safe and (lowered == "style" or "url(" in value.lower()):
                safe = not _UNSAFE_CSS.search(value)
        if not safe:
            del el.attrib[name]
            removed.append(f"attribute {local}")


def _clean(el: ET.Element, removed: list[str]) -> None:
    for child in list(el):
        ns, local = _local(child.tag) if isinstance(child.tag, str) else (None, "")
        if ns != SVG_NS or local not in ALLOWED_ELEMENTS:
            el.remove(child)
            removed.append(f"element {local or 'non-element'}")
            continue
        if local == "style" and child.text and _UNSAFE_CSS.search(child.text):
            child.text = ""
            removed.append("style rule")
        _clean_attributes(child, removed)
        _clean(child, removed)


def parse_svg(text: str) -> ET.Element:
    try:
        root = fromstring(text, forbid_dtd=False)  # abcm2ps writes an (external, harmless) SVG 1.1 DOCTYPE
    except Exception as exc:  # ParseError and defusedxml's entity/DTD refusals
        raise SvgError(f"score SVG is not well-formed XML: {exc}") from exc
    if root.tag != f"{{{SVG_NS}}}svg":
        raise SvgError(f"score is not an SVG document (root element {root.tag!r})")
    return root


def sanitize_tree(root: ET.Element) -> list[str]:
    removed: list[str] = []
    _clean_attributes(root, removed)
    _clean(root, removed)
    return removed


def sanitize_svg(text: str) -> CleanSvg:
    """The SVG with everything outside the allowlist removed (raises :class:`SvgError` on malformed XML)."""
    root = parse_svg(text)
    removed = sanitize_tree(root)
    return CleanSvg(ET.tostring(root, encoding="unicode", xml_declaration=False), removed)


def _length(value: str | None) -> float:
    m = _LENGTH.match(value or "")
    return float(m.group(1)) if m else 0.0


def svg_size(text: str) -> tuple[float, float]:
    """(width, height) in px of an SVG whose root gives them in px (as abcm2ps does)."""
    root = parse_svg(text)
    return _length(root.get("width")), _length(root.get("height"))


def join_pages(pages: list[str]) -> CleanSvg:
    """One sanitized SVG holding ``pages`` stacked top to bottom (abcm2ps ``-v`` writes one file per page)."""
    outer = ET.Element(f"{{{SVG_NS}}}svg", {"version": "1.1"})
    removed: list[str] = []
    width = height = 0.0
    for page in pages:
        root = parse_svg(page)
        removed += sanitize_tree(root)
        page_w, page_h = _length(root.get("width")), _length(root.get("height"))
        root.set("x", "0")
        root.set("y", f"{height:.2f}")
        outer.append(root)
        width, height = max(width, page_w), height + page_h
    outer.set("width", f"{width:.2f}px")
    outer.set("height", f"{height:.2f}px")
    outer.set("viewBox", f"0 0 {width:.2f} {height:.2f}")
    return CleanSvg(ET.tostring(outer, encoding="unicode", xml_declaration=False), removed)
