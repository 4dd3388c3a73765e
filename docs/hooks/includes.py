"""MkDocs hook: pages show generated files instead of copies of them, and every method page is listed.

* A line ``<!-- include: PATH -->`` in a page (PATH relative to the repository root) is replaced at
  build time by that file's markdown: its title (a first ``#`` heading) dropped, its other headings
  moved under the heading the marker stands below, and its relative links and images rewritten to
  stay right from the including page. This is how the experiment report (``docs/report/*/summary.md``,
  written by ``docs/make_report.sh``), the family table (``docs/family_coverage.md``, written by
  ``benchmarks/family_coverage.py``) and the README (the home page) appear in the site: regenerate the
  file and rebuild, nothing is typed twice. A missing file is a build error.
* The ``Methods`` section of the navigation lists ``methods/index.md``, the pages named in
  ``mkdocs.yml``, then every other ``docs/methods/*.md`` by file name; a line ``<!-- methods -->`` is
  replaced by a list of those pages, each with its title and the first sentence of its first paragraph.
  Adding a method to the docs is adding its page.
* Sphinx roles left in docstrings (``:class:`~coopkit.config.PromptConfig```) render as plain code
  (``PromptConfig``) in the API reference instead of showing the role's markup.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.exceptions import PluginError

INCLUDE = re.compile(r"^<!-- include: (\S+) -->$", re.M)
METHODS = "<!-- methods -->"
HEADING = re.compile(r"^(#{1,6}) ", re.M)
LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
SPHINX_ROLE = re.compile(r":(?:mod|class|func|meth|attr|data|exc|obj):\s*<code>(~?)([\w.]+)</code>")


def _root(config) -> Path:
    return Path(config["config_file_path"]).parent


def _outside_fences(text: str, change) -> str:
    """``change`` applied to the text between fenced code blocks only."""
    out, last = [], 0
    for block in FENCE.finditer(text):
        out += [change(text[last:block.start()]), block.group(0)]
        last = block.end()
    return "".join(out + [change(text[last:])])


def _relink(text: str, source: Path, page: Path) -> str:
    """Relative link targets in ``text`` (written from ``source``'s folder) rewritten from ``page``'s."""
    def fix(m: re.Match) -> str:
        target = m.group(2)
        if re.match(r"^([a-z][a-z0-9+.-]*:|#|/)", target):
            return m.group(0)
        path, _, anchor = target.partition("#")
        moved = posixpath.relpath(posixpath.normpath(posixpath.join(source.parent.as_posix(), path)),
                                  page.parent.as_posix())
        return m.group(1) + moved + ("#" + anchor if anchor else "") + m.group(3)
    return _outside_fences(text, lambda part: LINK.sub(fix, part))


def _included(path: str, page_text_before: str, page: Path, root: Path) -> str:
    source = root / path
    if not source.is_file():
        raise PluginError(f"{page.relative_to(root)} includes {path}, which does not exist; "
                          "regenerate it (see the page) or remove the include")
    text = source.read_text(encoding="utf-8").strip("\n")
    text = re.sub(r"\A# [^\n]*\n+", "", text)  # its title: the page has its own
    above = [len(h) for h in HEADING.findall(FENCE.sub("", page_text_before))]
    levels = [len(h) for h in HEADING.findall(FENCE.sub("", text))]
    if levels:
        shift = (above[-1] + 1 if above else 2) - min(levels)
        text = _outside_fences(text, lambda part: HEADING.sub(
            lambda m: "#" * min(6, max(1, len(m.group(1)) + shift)) + " ", part))
    return _relink(text, source.relative_to(root), page.relative_to(root))


def _method_pages(docs_dir: Path, named: list[str]) -> list[str]:
    found = sorted(f"methods/{p.name}" for p in (docs_dir / "methods").glob("*.md") if p.name != "index.md")
    return ["methods/index.md"] + [p for p in named if p in found] + [p for p in found if p not in named]


def _summary(page: Path) -> tuple[str, str]:
    """A method page's title and the first sentence of its first paragraph."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    title = re.search(r"^# (.+)$", text, re.M)
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip() and not p.lstrip().startswith(("#", "<!--", "|", "!["))]
    first = " ".join(paragraphs[0].split()) if paragraphs else ""
    sentence = re.split(r"(?<=\.)\s(?=[A-Z`*])", first, maxsplit=1)[0]
    return (title.group(1).strip() if title else page.stem), sentence


def on_config(config):
    """The Methods section of the nav: its index, the pages named in mkdocs.yml, then the rest."""
    docs_dir = Path(config["docs_dir"])
    for entry in config["nav"] or []:
        if isinstance(entry, dict) and "Methods" in entry:
            named = [next(iter(e.values())) if isinstance(e, dict) else e for e in entry["Methods"]]
            entry["Methods"] = _method_pages(docs_dir, named)
    return config


def on_page_markdown(markdown: str, page, config, files):
    root, docs_dir = _root(config), Path(config["docs_dir"])
    page_path = docs_dir / page.file.src_path

    def include(m: re.Match) -> str:
        return _included(m.group(1), markdown[:m.start()], page_path, root)

    markdown = INCLUDE.sub(include, markdown)
    if METHODS in markdown:
        nav = next((e["Methods"] for e in config["nav"] or [] if isinstance(e, dict) and "Methods" in e), [])
        rows = []
        for rel in nav[1:]:
            title, sentence = _summary(docs_dir / rel)
            rows.append(f"- [{title}]({posixpath.relpath(rel, posixpath.dirname(page.file.src_path))}): {sentence}")
        markdown = markdown.replace(METHODS, "\n".join(rows))
    return markdown


def on_page_content(html: str, page, config, files) -> str:
    """Sphinx roles in rendered docstrings as plain code (``~`` keeps the last name only, as Sphinx does)."""
    return SPHINX_ROLE.sub(lambda m: f"<code>{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}</code>", html)
