"""MkDocs hook of the Wove documentation site (``hooks:`` in ``mkdocs.yml``).

What it adds to the pages in ``docs/``, all computed from the code at build time so the
site cannot drift from it:

* ``reference/<module>.md``: one API page per public module of every distribution
  (``wove-*/src/<package>``; a module or package whose name starts with ``_`` is
  private), rendered by mkdocstrings. A page committed under ``docs/reference/`` with
  the same name wins (``wove.environment`` has one, laid out like Wove 2.x's page).
  The pages are added to the nav entry ``API reference``, grouped by distribution.
* ``distributions/<name>.md``: each distribution's README, and ``distributions/index.md``
  the workspace README, added to the nav entry ``Distributions``.
* ``examples/<name>.md``: each program in ``examples/`` with its source, added to the nav
  entry ``Examples``; ``examples/index.md`` is ``examples/README.md``.
* An engine page ``docs/engines/<name>.md`` that the nav does not list is appended to
  the nav section ``Executors and engines`` (so a page written by an engine adapter's
  author is never left out; list it in ``mkdocs.yml`` to choose its place and title).
* Markers replaced in any page:

  - ``<!-- wove:options -->``: the ``executor_config`` keys of every installed executor,
    read from each executor's :class:`wove.options.OptionSpec`;
  - ``<!-- wove:options NAME -->``: the keys of one executor;
  - ``<!-- wove:option-groups -->``: the shared key groups (re-delivery, TLS, callback);
  - ``<!-- wove:executors -->``: which distribution provides which executor and worker
    service;
  - ``<!-- wove:definition-keys -->`` before a table: the table's first column is
    checked against :data:`wove.config.DEFINITION_KEYS` (a missing or unknown key
    fails a ``--strict`` build).

* Links that leave ``docs/`` (``../wove-core/README.md``, ``../examples/x.py``) are
  pointed at the generated page for that file; a link to another existing repository
  file becomes its path in code; a link to nothing is left for MkDocs to report.

Run ``uv run mkdocs build --strict``: every warning (a broken link or anchor, a page
missing from the nav, a nav entry without its page, a definition key the configuration
page lacks) fails the build.
"""

from __future__ import annotations

import html
import logging
import posixpath
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger("mkdocs.hooks.wove_docs")

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

API_NAV_TITLE = "API reference"
DISTRIBUTIONS_NAV_TITLE = "Distributions"
EXAMPLES_NAV_TITLE = "Examples"
ENGINES_NAV_TITLE = "Executors and engines"


# -- what is in the repository ---------------------------------------------------------
@dataclass
class Distribution:
    """One distribution folder of the workspace."""

    folder: str
    name: str
    summary: str
    packages: list[str] = field(default_factory=list)

    @property
    def readme(self) -> Path:
        return ROOT / self.folder / "README.md"

    @property
    def page(self) -> str:
        return f"distributions/{self.name}.md"


def distributions() -> list[Distribution]:
    """The workspace's distributions (``wove-core`` first), with their import packages."""
    found = []
    for pyproject in sorted(ROOT.glob("wove-*/pyproject.toml")):
        folder = pyproject.parent
        project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
        packages = sorted(p.parent.name for p in folder.glob("src/*/__init__.py"))
        found.append(Distribution(folder.name, project.get("name", folder.name), project.get("description", ""),
                                  packages))
    found.sort(key=lambda d: (d.name != "wove-core", d.name != "wove-backend", d.name))
    return found


def public_modules(distribution: Distribution) -> list[str]:
    """Dotted names of the public modules of ``distribution`` (packages first, then sorted)."""
    modules = []
    for package in distribution.packages:
        base = ROOT / distribution.folder / "src"
        for path in sorted((base / package).rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if any(part.startswith("_") for part in parts):
                continue
            modules.append(".".join(parts))
    return sorted(modules, key=lambda m: (m.count(".") > 0, m))


def examples() -> list[Path]:
    """The example programs (``examples/*.py`` and ``examples/*/`` folders with a README)."""
    folder = ROOT / "examples"
    if not folder.is_dir():
        return []
    programs = [p for p in sorted(folder.glob("*.py")) if not p.name.startswith("_")]
    programs += [p for p in sorted(folder.iterdir()) if p.is_dir() and (p / "README.md").is_file()]
    return programs


def example_page(path: Path) -> str:
    return f"examples/{path.stem}.md"


# -- generated Markdown ------------------------------------------------------------------
def reference_page(module: str) -> str:
    """The Markdown of the API page of ``module``."""
    return f"# `{module}`\n\n::: {module}\n"


def _first_docstring_line(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    match = re.match(r'\s*(?:#.*\n\s*)*[rub]*("""|\'\'\')(.*?)(\1|\n)', text, re.S)
    return match.group(2).strip() if match else ""


def example_markdown(path: Path) -> str:
    """The page of one example: its docstring's first line, how to run it, its source."""
    rel = path.relative_to(ROOT).as_posix()
    if path.is_dir():
        lines = [(path / "README.md").read_text(encoding="utf-8").rstrip(), ""]
        for source in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".py", ".toml")
                             and "__pycache__" not in p.parts):
            language = "toml" if source.suffix == ".toml" else "python"
            lines += [f"## `{source.relative_to(path).as_posix()}`", "",
                      f"```{language}", source.read_text(encoding="utf-8").rstrip(), "```", ""]
        return "\n".join(lines)
    summary = _first_docstring_line(path).rstrip(".")
    return "\n".join([
        f"# {summary or path.stem}", "", f"`examples/{path.name}`", "",
        f"From a checkout: `uv run python {rel}` (the test suite runs it: `tests/test_examples.py`).", "",
        "```python", path.read_text(encoding="utf-8").rstrip(), "```", "",
    ])


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(value: Any) -> str:
    return f"`{value!r}`".replace("|", "\\|")


def option_specs() -> tuple[dict[str, Any], dict[str, list[str]], dict[str, Any]]:
    """``(name -> OptionSpec or None, name -> alias names, name -> ExecutorInfo)`` for
    every installed executor; an alias is listed under the name it stands for."""
    import importlib

    from wove.options import OptionSpec
    from wove.registry import get_registry

    registry = get_registry()
    registry.load_all()
    specs: dict[str, Any] = {}
    aliases: dict[str, list[str]] = {}
    infos: dict[str, Any] = {}
    seen: dict[int, str] = {}
    for info in registry.executors():
        if info.alias_of:
            aliases.setdefault(info.alias_of, []).append(info.name)
            continue
        spec = getattr(info.factory(), "config_options", None)
        if spec is None:
            # engine adapters declare their spec on the adapter: the distribution exports it
            package = importlib.import_module(info.factory.__module__.split(".")[0])
            candidates = [getattr(package, name) for name in getattr(package, "__all__", ())]
            matches = [c for c in candidates if isinstance(c, OptionSpec) and c.executor == info.name]
            spec = matches[0] if matches else None
        if spec is not None and id(spec) in seen:  # another name of one executor (http / https)
            aliases.setdefault(seen[id(spec)], []).append(info.name)
            continue
        if spec is not None:
            seen[id(spec)] = info.name
        specs[info.name], infos[info.name] = spec, info
        aliases.setdefault(info.name, [])
    return specs, aliases, infos


def option_groups() -> dict[str, Any]:
    """The shared key groups: title -> OptionSpec (largest first, for matching)."""
    from wove.options import CALLBACK_OPTIONS, REDELIVERY_OPTIONS
    from wove.tls import TLS_OPTIONS

    return {"backend callback keys": CALLBACK_OPTIONS, "TLS keys": TLS_OPTIONS,
            "re-delivery keys": REDELIVERY_OPTIONS}


GROUP_ANCHORS = {"backend callback keys": "backend-callback-keys", "TLS keys": "tls-keys",
                 "re-delivery keys": "re-delivery-keys"}


def options_table(options: list[Any]) -> list[str]:
    rows = ["| key | value | default | meaning |", "|---|---|---|---|"]
    for option in options:
        older = f" (older: {', '.join(f'`{a}`' for a in option.aliases)})" if option.aliases else ""
        default = "required" if option.required else ("" if option.default is None else _code(option.default))
        rows.append(f"| `{option.name}`{older} | {_cell(option.kind.expected)} | {default} | {_cell(option.doc)} |")
    return rows


def executor_options_markdown(name: str, spec: Any, aliases: list[str], info: Any, *, heading: str = "###",
                              link_prefix: str = "") -> str:
    """The ``executor_config`` section of one executor."""
    title = " / ".join(f"`{n}`" for n in [name, *aliases])
    lines = [f"{heading} {title}", ""]
    if info is not None:
        lines += [f"Provided by **{info.distribution}**{f': {info.description}' if info.description else ''}.", ""]
    if spec is None:
        lines += ["This executor declares no `config_options`: its keys are not checked when it starts "
                  "(see its page).", ""]
        return "\n".join(lines)
    remaining = dict(spec.options)
    included = []
    for title_, group in option_groups().items():
        if all(remaining.get(key) is option for key, option in group.options.items()):
            included.append(title_)
            for key in group.options:
                remaining.pop(key)
    lines += options_table(list(remaining.values())) if remaining else ["No keys of its own."]
    if included:
        links = ", ".join(f"[{t}]({link_prefix}configuration.md#{GROUP_ANCHORS[t]})" for t in included)
        lines += ["", f"Also: the {links}."]
    lines.append("")
    return "\n".join(lines)


def all_options_markdown(link_prefix: str = "") -> str:
    specs, aliases, infos = option_specs()
    return "\n".join(executor_options_markdown(name, specs[name], aliases[name], infos[name],
                                               link_prefix=link_prefix) for name in sorted(specs))


def option_groups_markdown() -> str:
    lines = []
    for title, group in reversed(option_groups().items()):
        keys = dict(group.options)
        if title == "backend callback keys":  # it includes the re-delivery keys: list its own
            from wove.options import REDELIVERY_OPTIONS

            keys = {k: v for k, v in keys.items() if k not in REDELIVERY_OPTIONS.options}
        lines += [f"### {title[0].upper()}{title[1:]}", "", *options_table(list(keys.values())), ""]
        if title == "backend callback keys":
            lines += ["(and the re-delivery keys)", ""]
    return "\n".join(lines)


def executors_markdown() -> str:
    """Which distribution provides which executor and ``wove worker`` service."""
    from wove.registry import KNOWN_DISTRIBUTIONS, KNOWN_SERVICES, PLANNED_EXECUTORS

    _, aliases, infos = option_specs()
    provided: dict[str, str] = {name: info.distribution for name, info in infos.items()}
    names: dict[str, list[str]] = {}
    for name, distribution in KNOWN_DISTRIBUTIONS.items():
        provided.setdefault(name, distribution)
    alias_of = {alias: name for name, names_ in aliases.items() for alias in names_}
    for name, distribution in sorted(provided.items()):
        if name in alias_of:
            continue
        names.setdefault(distribution, []).append(name)
    services: dict[str, list[str]] = {}
    for service, distribution in KNOWN_SERVICES.items():
        services.setdefault(distribution, []).append(service)
    rows = ["| executor (`\"executor\": …`) | distribution | `wove worker …` | installed here |", "|---|---|---|---|"]
    for distribution in sorted(names, key=lambda d: (d != "wove-core", d)):
        for name in names[distribution]:
            shown = " / ".join(f"`{n}`" for n in [name, *aliases.get(name, [])])
            service = ", ".join(f"`{s}`" for s in services.get(distribution, [])
                                if s == name or (name == "websocket" and s == "websocket"))
            state = "yes" if name in infos else "not yet registered"
            rows.append(f"| {shown} | `{distribution}` | {service} | {state} |")
    for name, why in sorted(PLANNED_EXECUTORS.items()):
        rows.append(f"| `{name}` | — | | {_cell(why.split(' (')[0])} |")
    return "\n".join(rows)


# -- links -------------------------------------------------------------------------------
LINK = re.compile(r"(?<!!)\[(?P<text>[^\]\n]*)\]\((?P<target>[^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)", re.M)


def rewrite_links(markdown: str, repo_path: str, page_uri: str, targets: dict[str, str]) -> str:
    """Point links that leave ``docs/`` at the generated page for their file.

    Args:
        markdown: the page's Markdown.
        repo_path: the page's file in the repository (``docs/x.md``, ``wove-core/README.md``).
        page_uri: the page's path in the site (``x.md``, ``distributions/wove-core.md``).
        targets: repository path -> site path of the generated pages.
    """
    base = posixpath.dirname(repo_path)

    def replace(match: re.Match[str]) -> str:
        text, target = match.group("text"), match.group("target")
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
            return match.group(0)
        path, _, anchor = target.partition("#")
        resolved = posixpath.normpath(posixpath.join(base, path)) if path else repo_path
        if resolved.startswith("docs/"):
            site = resolved[len("docs/"):]
            if repo_path.startswith("docs/"):
                return match.group(0)
        elif resolved.rstrip("/") in targets:
            site = targets[resolved.rstrip("/")]
        elif (ROOT / resolved).exists():
            shown = f"`{resolved}`"
            return shown if text.strip("`") in (resolved, path, posixpath.basename(resolved)) else f"{text} ({shown})"
        else:
            return match.group(0)  # nothing there: MkDocs reports the broken link
        relative = posixpath.relpath(site, posixpath.dirname(page_uri) or ".")
        return f"[{text}]({relative}{'#' + anchor if anchor else ''})"

    parts = re.split(r"(^```.*?^```[^\n]*$)", markdown, flags=re.M | re.S)
    return "".join(part if part.startswith("```") else LINK.sub(replace, part) for part in parts)


# -- checks ------------------------------------------------------------------------------
def definition_key_problems(markdown: str) -> list[str]:
    """Differences between the table after ``<!-- wove:definition-keys -->`` and the code."""
    from wove.config import DEFINITION_KEYS

    problems = []
    for match in re.finditer(r"<!-- wove:definition-keys -->\s*\n((?:\|.*\n?)+)", markdown):
        rows = [row for row in match.group(1).splitlines()[2:] if row.strip()]
        documented = set()
        for row in rows:
            documented.update(re.findall(r"`([a-z_]+)`", row.split("|")[1]))
        missing, unknown = sorted(DEFINITION_KEYS - documented), sorted(documented - DEFINITION_KEYS)
        if missing:
            problems.append(f"definition keys missing from the table: {', '.join(missing)}")
        if unknown:
            problems.append(f"the table lists keys that are not definition keys: {', '.join(unknown)}")
    return problems


# -- MkDocs events -----------------------------------------------------------------------
_generated: dict[str, str] = {}  # site path -> repository path of its source


def _nav_replace(nav: list[Any], title: str, pages: list[Any]) -> bool:
    for index, item in enumerate(nav):
        if isinstance(item, dict):
            for key, value in item.items():
                if key == title:
                    index_page = value if isinstance(value, str) else None
                    nav[index] = {key: ([index_page] if index_page else []) + pages}
                    return True
                if isinstance(value, list) and _nav_replace(value, title, pages):
                    return True
    return False


def engine_pages_missing_from(nav: Any) -> list[str]:
    """``docs/engines/*.md`` pages that ``nav`` does not list (sorted)."""
    listed = set(_nav_pages(nav))
    return sorted(f"engines/{p.name}" for p in (DOCS / "engines").glob("*.md") if f"engines/{p.name}" not in listed)


def _nav_pages(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [page for item in node for page in _nav_pages(item)]
    if isinstance(node, dict):
        return [page for value in node.values() for page in _nav_pages(value)]
    return []


def _append_to_section(nav: list[Any], title: str, pages: list[Any]) -> bool:
    for item in nav:
        if isinstance(item, dict):
            for key, value in item.items():
                if key == title and isinstance(value, list):
                    value.extend(pages)
                    return True
                if isinstance(value, list) and _append_to_section(value, title, pages):
                    return True
    return False


def on_config(config: Any) -> Any:
    nav = config.get("nav")
    if not nav:
        return config
    # an engine page written after mkdocs.yml was last edited is listed too (by its file name)
    extra = [{p[len("engines/"):-len(".md")]: p} for p in engine_pages_missing_from(nav)]
    if extra and not _append_to_section(nav, ENGINES_NAV_TITLE, extra):
        log.warning("mkdocs.yml: the nav has no section titled %r for %s", ENGINES_NAV_TITLE, extra)
    api = []
    for dist in distributions():
        modules = public_modules(dist)
        if modules:
            api.append({dist.name: [{m: f"reference/{m}.md"} for m in modules]})
    for title, pages in ((API_NAV_TITLE, api),
                         (DISTRIBUTIONS_NAV_TITLE, [{d.name: d.page} for d in distributions()]
                          + [{"executor plugin template": "distributions/template.md"}]),
                         (EXAMPLES_NAV_TITLE, [{p.name + ("/" if p.is_dir() else ""): example_page(p)}
                                               for p in examples()])):
        if not _nav_replace(nav, title, pages):
            log.warning("mkdocs.yml: the nav has no entry titled %r for the generated pages", title)
    return config


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    _generated.clear()

    def add(uri: str, content: str, source: str) -> None:
        _generated[uri] = source
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, content=content))

    for dist in distributions():
        for module in public_modules(dist):
            add(f"reference/{module}.md", reference_page(module), f"docs/reference/{module}.md")
        if dist.readme.is_file():
            add(dist.page, dist.readme.read_text(encoding="utf-8"), f"{dist.folder}/README.md")
    add("distributions/index.md", (ROOT / "README.md").read_text(encoding="utf-8"), "README.md")
    template = ROOT / "templates" / "executor-plugin" / "README.md"
    if template.is_file():
        add("distributions/template.md", template.read_text(encoding="utf-8"), "templates/executor-plugin/README.md")
    if (ROOT / "examples" / "README.md").is_file():
        add("examples/index.md", (ROOT / "examples" / "README.md").read_text(encoding="utf-8"), "examples/README.md")
    for path in examples():
        add(example_page(path), example_markdown(path), f"examples/{path.name}/README.md" if path.is_dir()
            else f"examples/{path.name}")
    return files


def _link_targets() -> dict[str, str]:
    targets = {}
    for uri, source in _generated.items():
        targets[source] = uri
        if source.endswith("/README.md"):
            targets[source[: -len("/README.md")]] = uri
    return targets


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    uri = page.file.src_uri
    repo_path = _generated.get(uri, f"docs/{uri}")
    prefix = posixpath.relpath(".", posixpath.dirname(uri) or ".")
    prefix = "" if prefix == "." else prefix + "/"
    if "<!-- wove:" in markdown:
        for problem in definition_key_problems(markdown):
            log.warning("%s: %s (wove.config.DEFINITION_KEYS)", uri, problem)
        specs: tuple[dict[str, Any], dict[str, list[str]], dict[str, Any]] | None = None

        def one(match: re.Match[str]) -> str:
            nonlocal specs
            specs = specs or option_specs()
            name = match.group(1)
            if name not in specs[0]:
                log.warning("%s: <!-- wove:options %s -->: no installed executor is named %r", uri, name, name)
                return ""
            return executor_options_markdown(name, specs[0][name], specs[1][name], specs[2][name],
                                             heading="####", link_prefix=prefix)

        markdown = re.sub(r"<!-- wove:options ([a-z0-9_]+) -->", one, markdown)
        markdown = markdown.replace("<!-- wove:options -->", all_options_markdown(prefix))
        markdown = markdown.replace("<!-- wove:option-groups -->", option_groups_markdown())
        markdown = markdown.replace("<!-- wove:executors -->", executors_markdown())
    return rewrite_links(markdown, repo_path, uri, _link_targets())


ROLE = re.compile(r":(?:class|meth|func|data|attr|mod|exc|obj|const):<code>(~?)([A-Za-z_][\w.]*)(\(\))?</code>")


def sphinx_roles_to_links(content: str, module: str | None) -> str:
    """Turn the reST roles of docstrings (``:class:`~wove.runtime.ExecutorRuntime```), which
    Markdown shows as ``:class:`` followed by code, into links where the target is
    documented (an optional cross-reference: plain code where it is not)."""

    def replace(match: re.Match[str]) -> str:
        tilde, name, call = match.groups()
        name = name.lstrip(".")
        shown = name.rsplit(".", 1)[-1] if tilde else name
        if name.split(".")[0] in ("wove",) or name.split(".")[0].startswith("wove_") or module is None:
            identifier = name
        else:
            identifier = f"{module}.{name}"
        return (f'<autoref identifier="{html.escape(identifier)}" optional>'
                f"<code>{html.escape(shown)}{call or ''}</code></autoref>")

    return ROLE.sub(replace, content)


def on_page_content(content: str, page: Any, config: Any, files: Any) -> str:
    uri = page.file.src_uri
    module = uri[len("reference/"):-len(".md")] if uri.startswith("reference/") and uri != "reference/index.md" else None
    return sphinx_roles_to_links(content, module)
