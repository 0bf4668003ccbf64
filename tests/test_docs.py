"""The documentation site's sources: every public name has a docstring for the API reference
(mkdocstrings leaves out an object without one, silently), and the site hook maps the
repository's relative links to the site's."""

import importlib.util

import pytest

from tests.conftest import REPO

griffe = pytest.importorskip("griffe")  # the `docs` extra (in `dev`)

PUBLIC_MODULES = ("fewshot", "fewshot.backbones", "fewshot.datasets", "fewshot.training")

spec = importlib.util.spec_from_file_location("site_hooks", REPO / "scripts" / "site_hooks.py")
assert spec is not None and spec.loader is not None
site_hooks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(site_hooks)


def undocumented() -> list[str]:
    """Public names (`__all__` of PUBLIC_MODULES) and public methods and properties of public
    classes whose docstring is missing, as the API reference sees them: through griffe, with
    an overriding method given the docstring it overrides, as mkdocs.yml's extension does."""
    package = griffe.load(
        "fewshot",
        search_paths=[REPO / "src"],
        extensions=griffe.load_extensions("griffe_inherited_docstrings"),
        resolve_aliases=True,
    )
    missing = []
    for module_name in PUBLIC_MODULES:
        module = package if module_name == "fewshot" else package[module_name[len("fewshot.") :]]
        assert module.exports, f"{module_name} has no __all__"
        for name in module.exports:
            obj = module[name]
            if not obj.docstring:
                missing.append(f"{module_name}.{name}")
            if not obj.is_class:
                continue
            for member_name, member in obj.members.items():
                routine = member.is_function or "property" in member.labels
                if routine and not member_name.startswith("_") and not member.docstring:
                    missing.append(f"{module_name}.{name}.{member_name}")
    return missing


def test_every_public_name_and_method_has_a_docstring():
    assert undocumented() == []


def test_the_public_modules_export_only_what_they_define_or_import():
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            assert hasattr(module, name), f"{module_name}.__all__ names {name!r}"


def test_repository_paths_map_to_site_paths():
    assert site_hooks.site_path("README.md", "docs") == "index.md"
    assert site_hooks.site_path("docs/methods/maml.md", "docs") == "methods/maml.md"
    assert site_hooks.site_path("benchmarks/results.md", "docs") == "benchmarks/results.md"


def test_link_targets_are_repository_paths():
    markdown = (
        '[a](docs/methods/README.md) ![b](plots/x.png "t") [c](../benchmarks/r.md#h) '
        "[d](https://example.org/x.md) [e](#anchor)"
    )
    assert site_hooks.link_targets(markdown, "README.md") == [
        "docs/methods/README.md",
        "plots/x.png",
        "../benchmarks/r.md",
    ]
    assert site_hooks.link_targets("[c](../benchmarks/r.md#h)", "docs/performance.md") == [
        "benchmarks/r.md"
    ]
