"""MkDocs hooks (mkdocs.yml `hooks:`): the site is the repository's Markdown as GitHub shows it.

README.md becomes the site's index, and the files outside docs/ that a page links to
(CHANGELOG.md, LICENSE, benchmarks/*.md, and what those link to in turn) join the site at their
repository paths. Relative links are rewritten from repository paths to site paths, so every
link in the sources stays the one GitHub follows. A link to a file that does not exist maps to
no site file, and `mkdocs build --strict` fails on it as on any broken link.

The tutorials (docs/tutorials/*.py) are rendered by mkdocs-jupyter to HTML, which mkdocs does
not check: their `page.md` links are checked and made site URLs here, after rendering.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files, InclusionLevel
from mkdocs.structure.pages import Page

# Inline links and images, [text](target) and [text](target "title"): the forms the docs use.
LINK = re.compile(r"(\]\()([^)\s]+)")
# A target with a scheme (https:, mailto:) or only an anchor is not a repository path.
NOT_A_PATH = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*:|#|/)")

# href="page.md" or "page.md#anchor" in rendered HTML: a relative link to a page's source.
HREF = re.compile(r'href="([^"#:?]+\.md)(#[^"]*)?"')
log = logging.getLogger("mkdocs.hooks.site_hooks")  # a warning fails --strict

# Site path of each file that comes from outside docs/ -> its path in the repository.
_outside: dict[str, str] = {}


def _paths(config: MkDocsConfig) -> tuple[Path, str]:
    """The repository's root, and docs/ relative to it."""
    repo = Path(config.config_file_path).resolve().parent
    return repo, Path(config.docs_dir).resolve().relative_to(repo).as_posix()


def site_path(repo_path: str, docs: str) -> str:
    """Where a repository file lies in the site: docs/X at X, README.md at index.md, any
    other file at its repository path."""
    if repo_path == "README.md":
        return "index.md"
    if repo_path.startswith(docs + "/"):
        return repo_path[len(docs) + 1 :]
    return repo_path


def repository_path(src_uri: str, docs: str) -> str:
    """The inverse of `site_path` for the site's files."""
    return _outside.get(src_uri) or f"{docs}/{src_uri}"


def link_targets(markdown: str, page: str) -> list[str]:
    """The repository paths that a page at repository path `page` links to."""
    targets = []
    for match in LINK.finditer(markdown):
        path = match.group(2).split("#", 1)[0]
        if path and not NOT_A_PATH.match(path):
            targets.append(posixpath.normpath(posixpath.join(posixpath.dirname(page), path)))
    return targets


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add README.md as index.md, then every existing repository file outside docs/ that a
    Markdown page links to, following links from the pages added."""
    repo, docs = _paths(config)
    _outside.clear()
    pending = [f"{docs}/{f.src_uri}" for f in files if f.src_uri.endswith(".md")]
    pending.append("README.md")
    _outside["index.md"] = "README.md"
    files.append(File.generated(config, "index.md", abs_src_path=str(repo / "README.md")))
    while pending:
        page = pending.pop()
        for target in link_targets((repo / page).read_text(encoding="utf-8"), page):
            outside = target != docs and not target.startswith((docs + "/", "../"))
            if not outside or target in _outside.values() or not (repo / target).is_file():
                continue  # in docs/, added already, or broken (left for mkdocs to report)
            _outside[target] = target
            files.append(
                File.generated(
                    config,
                    target,
                    abs_src_path=str(repo / target),
                    inclusion=InclusionLevel.NOT_IN_NAV,
                )
            )
            if target.endswith(".md"):
                pending.append(target)
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Rewrite the relative links that leave docs/, or that start outside it, to site paths."""
    _, docs = _paths(config)
    source = repository_path(page.file.src_uri, docs)
    here = posixpath.dirname(page.file.src_uri)

    def rewrite(match: re.Match[str]) -> str:
        target = match.group(2)
        path, hash_, anchor = target.partition("#")
        if not path or NOT_A_PATH.match(path):
            return match.group(0)
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(source), path))
        if source.startswith(docs + "/") and resolved.startswith(docs + "/"):
            return match.group(0)  # within docs/: the link is already the site's
        moved = posixpath.relpath(site_path(resolved, docs), here or ".")
        return match.group(1) + moved + hash_ + anchor

    return LINK.sub(rewrite, markdown)


def on_page_content(html: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    """In a rendered tutorial, make each `page.md` link the URL of that page; warn (so
    --strict fails) where no page has that source."""
    if not page.file.src_uri.endswith(".py"):
        return html  # Markdown pages: mkdocs has checked and rewritten their links

    def rewrite(match: re.Match[str]) -> str:
        target = posixpath.normpath(
            posixpath.join(posixpath.dirname(page.file.src_uri), match.group(1))
        )
        file = files.get_file_from_path(target)
        if file is None:
            log.warning(f"tutorial '{page.file.src_uri}' links to '{match.group(1)}', not found")
            return match.group(0)
        return f'href="{file.url_relative_to(page.file)}{match.group(2) or ""}"'

    return HREF.sub(rewrite, html)
