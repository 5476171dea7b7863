"""The documentation site's hook (docs/hooks/wove_docs.py) and nav.

``uv run mkdocs build --strict`` is the full check (broken links and anchors, pages
missing from the nav, nav entries without a page); these tests check the parts that
must not drift from the code without building the site: the generated executor_config
tables cover every installed executor and every key, the definition-key table matches
``wove.config.DEFINITION_KEYS``, links that leave docs/ are pointed at pages, and every
page under docs/ is in the nav.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOOK = ROOT / "docs" / "hooks" / "wove_docs.py"


@pytest.fixture(scope="module")
def hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location("wove_docs_hook", HOOK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_installed_executor_and_every_key_is_in_the_configuration_reference(hook: ModuleType) -> None:
    from wove.registry import get_registry

    registry = get_registry()
    registry.load_all()
    page = hook.all_options_markdown() + "\n" + hook.option_groups_markdown()
    sections = dict(re.findall(r"^### ([^\n]+)\n(.*?)(?=^### |\Z)", page, flags=re.M | re.S))
    specs, aliases, _ = hook.option_specs()
    for info in registry.executors():
        assert f"`{info.name}`" in page, f"executor {info.name} is missing from the configuration reference"
    for name, spec in specs.items():
        title = " / ".join(f"`{n}`" for n in [name, *aliases[name]])
        assert title in sections, (title, sorted(sections))
        if spec is None:
            assert "declares no `config_options`" in sections[title]
            continue
        for key, option in spec.options.items():
            # a key is in its executor's own table, or in a shared group the section links to
            assert f"`{key}`" in sections[title] or any(
                key in group.options and f"#{hook.GROUP_ANCHORS[group_title]}" in sections[title]
                for group_title, group in hook.option_groups().items()), (name, key)
            for alias in option.aliases:
                assert f"`{alias}`" in page, (name, key, alias)


def test_the_local_executor_table_shows_kind_and_default(hook: ModuleType) -> None:
    specs, aliases, infos = hook.option_specs()
    text = hook.executor_options_markdown("local", specs["local"], aliases["local"], infos["local"])
    assert "| `max_concurrency` | a positive integer | `10000` | runs executing at once; more wait |" in text
    assert "Provided by **wove-core**" in text


def test_the_definition_key_table_matches_the_code(hook: ModuleType) -> None:
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert "<!-- wove:definition-keys -->" in page
    assert hook.definition_key_problems(page) == []
    broken = page.replace("| `capture_output` |", "| `capture_outputs` |")
    assert hook.definition_key_problems(broken) == [
        "definition keys missing from the table: capture_output",
        "the table lists keys that are not definition keys: capture_outputs"]


def test_links_that_leave_docs_point_at_the_generated_pages(hook: ModuleType) -> None:
    targets = {"wove-core/README.md": "distributions/wove-core.md", "wove-core": "distributions/wove-core.md",
               "examples/dask_cluster.py": "examples/dask_cluster.md"}
    text = ("[core](../wove-core/README.md#install), [guide](calling.md#one-call), [web](https://example.com), "
            "[ex](../examples/dask_cluster.py), [src](../wove-core/src/wove/runtime.py), "
            "[gone](../no-such-file.md)\n```python\n# [core](../wove-core/README.md)\n```\n")
    rewritten = hook.rewrite_links(text, "docs/x.md", "x.md", targets)
    assert "[core](distributions/wove-core.md#install)" in rewritten
    assert "[guide](calling.md#one-call)" in rewritten and "[web](https://example.com)" in rewritten
    assert "[ex](examples/dask_cluster.md)" in rewritten
    assert "src (`wove-core/src/wove/runtime.py`)" in rewritten  # a source file: its path, not a dead link
    assert "[gone](../no-such-file.md)" in rewritten               # left for MkDocs to report
    assert "# [core](../wove-core/README.md)" in rewritten         # code blocks are not touched
    # a README's own links, from its generated page
    nested = hook.rewrite_links("[core](../../wove-core/README.md)", "docs/engines/x.md", "engines/x.md", targets)
    assert nested == "[core](../distributions/wove-core.md)"
    readme = hook.rewrite_links("[plugins](../docs/plugins.md), [core](../wove-core/README.md)",
                                "wove-executor-http/README.md", "distributions/wove-executor-http.md", targets)
    assert readme == "[plugins](../plugins.md), [core](wove-core.md)"


def test_sphinx_roles_become_optional_cross_references(hook: ModuleType) -> None:
    html = hook.sphinx_roles_to_links(":class:<code>~wove.runtime.ExecutorRuntime</code> and "
                                      ":meth:<code>start</code>", "wove.environment")
    assert html == ('<autoref identifier="wove.runtime.ExecutorRuntime" optional><code>ExecutorRuntime</code>'
                    '</autoref> and <autoref identifier="wove.environment.start" optional><code>start</code>'
                    "</autoref>")


def test_every_page_under_docs_is_in_the_nav(hook: ModuleType) -> None:
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))

    def pages(node: object) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [page for item in node for page in pages(item)]
        if isinstance(node, dict):
            return [page for value in node.values() for page in pages(value)]
        return []

    listed = set(pages(config["nav"])) | set(hook.engine_pages_missing_from(config["nav"]))  # appended by the hook
    on_disk = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")
               if "hooks" not in p.parts}
    generated_here = {f"reference/{m}.md" for d in hook.distributions() for m in hook.public_modules(d)}
    missing = sorted(on_disk - listed - generated_here)
    assert not missing, f"add these pages to the nav in mkdocs.yml: {missing}"
    absent = sorted(p for p in listed - on_disk if not p.startswith(("examples/", "distributions/")))
    assert not absent, f"mkdocs.yml's nav lists pages that do not exist: {absent}"


def test_an_engine_page_missing_from_the_nav_is_appended_to_its_section(hook: ModuleType) -> None:
    import yaml

    config = {"nav": yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]}
    missing = hook.engine_pages_missing_from(config["nav"])
    hook.on_config(config)
    assert hook.engine_pages_missing_from(config["nav"]) == []
    section = next(item[hook.ENGINES_NAV_TITLE] for item in config["nav"]
                   if isinstance(item, dict) and hook.ENGINES_NAV_TITLE in item)
    for page in missing:
        assert {page[len("engines/"):-len(".md")]: page} in section


def test_every_distribution_has_a_reference_section(hook: ModuleType) -> None:
    dists = {d.name: hook.public_modules(d) for d in hook.distributions()}
    assert dists["wove-core"][0] == "wove" and "wove.environment" in dists["wove-core"]
    assert not any(part.startswith("_") for modules in dists.values() for m in modules for part in m.split("."))
    for name, modules in dists.items():
        assert modules, f"{name} has no public module for the API reference"
