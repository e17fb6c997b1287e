"""The import layers hold (docs/ARCHITECTURE.md): read from the source, lazy imports inside
functions included, so a shortcut across layers fails here before it becomes a cycle."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = ("glm4voice", "cosyvoice", "speech_tokenizer", "flow_inference", "model_server", "web_demo")
ENTRY_SCRIPTS = ("flow_inference", "model_server", "web_demo")

# unit -> units it must never import (a unit is a top-level package or module of ours, or a first-level
# module or subpackage of glm4voice, written without the "glm4voice." prefix)
FORBIDDEN = {
    "cosyvoice": set(OURS) - {"cosyvoice"},
    "speech_tokenizer": {"cosyvoice", *ENTRY_SCRIPTS, "llm", "server", "web", "openai_api", "pipeline", "decoder"},
    "defaults": {"*"},
    "llm": {"server", "web", "openai_api", "pipeline", "conversation", "client", "decoder", "speech_tokenizer"},
    "decoder": {"server", "web", "openai_api", "pipeline", "conversation", "client", "llm", "speech_tokenizer"},
    "server": {"web", "openai_api", "pipeline", "conversation", "client", "decoder", "speech_tokenizer", "cosyvoice"},
    "pipeline": {"server.app", "server.engine_backend", "web", "openai_api", "llm", "decoder", "cosyvoice"},
    "conversation": {"server", "web", "openai_api", "llm", "decoder", "cosyvoice", "speech_tokenizer"},
    "openai_api": {"server", "web", "llm", "decoder", "cosyvoice", "speech_tokenizer"},
    "client": {"server.app", "server.engine_backend", "llm", "web", "pipeline", "decoder"},
}
"""What each layer leaves alone: the models know nothing of serving, the token server nothing of the
speech side, the pipeline talks to the LLM only through the token client, and the OpenAI API is
built on the conversation session, not on the page or the server internals."""
EXCEPTIONS = {
    ("glm4voice.llm.quality", "speech_tokenizer"): "a command: it tokenizes spoken test prompts",
}
"""(module, unit it may import although its layer may not): why."""


def unit_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] not in OURS:
        return None
    if parts[0] != "glm4voice":
        return parts[0]
    return parts[1] if len(parts) > 1 else "glm4voice"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> list[Path]:
    files = [ROOT / f"{name}.py" for name in ENTRY_SCRIPTS]
    for package in ("glm4voice", "cosyvoice", "speech_tokenizer"):
        files += sorted((ROOT / package).rglob("*.py"))
    return files


def imports_of(path: Path) -> set[str]:
    """Every module of ours that ``path`` imports, at the top or inside a function."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return {name for name in found if unit_of(name) is not None}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports."""
    return {module_name(path): imports_of(path) for path in source_files()}


def short(module: str) -> str:
    return module.removeprefix("glm4voice.")


def matches(module: str, rule: str) -> bool:
    name = short(module)
    return rule == "*" or name == rule or name.startswith(rule + ".")


def violations(graph: dict[str, set[str]]) -> list[str]:
    broken = []
    for module, imported in graph.items():
        for layer, forbidden in FORBIDDEN.items():
            if not matches(module, layer):
                continue
            for name in imported:
                if unit_of(name) == unit_of(module) or (layer == "defaults" and name == "glm4voice"):
                    continue
                if (module, unit_of(name)) in EXCEPTIONS:
                    continue
                hits = [rule for rule in forbidden if matches(name, rule)]
                if hits:
                    broken.append(f"{module} imports {name} ({layer} must not import {hits[0]})")
    return sorted(broken)


def test_every_layer_leaves_alone_what_it_must(graph):
    broken = violations(graph)
    assert not broken, "\n".join(broken)


def test_the_library_never_imports_an_entry_script(graph):
    broken = [
        f"{module} imports {name}"
        for module, imported in graph.items()
        if module.startswith(("glm4voice", "cosyvoice", "speech_tokenizer"))
        for name in imported
        if name.split(".")[0] in ENTRY_SCRIPTS
    ]
    assert not broken, "\n".join(broken)


def test_the_units_of_the_library_form_no_cycle(graph):
    """Between glm4voice's subpackages and modules (lazy imports count too)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for module, imported in graph.items():
        source = unit_of(module)
        for name in imported:
            target = unit_of(name)
            if source and target and source != target and "glm4voice" not in (source, target):
                edges[source].add(target)
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle or [])


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_checker_finds_what_it_looks_for(tmp_path):
    """The rules are not vacuous: a lazy server import in the LLM package, a server module reaching
    into the page and a cycle are each reported; imports inside functions are read."""
    lazy = tmp_path / "lazy.py"
    lazy.write_text("def f():\n    from glm4voice.server.app import create_app\n", encoding="utf-8")
    module = ast.parse(lazy.read_text(encoding="utf-8"))
    assert any(isinstance(node, ast.ImportFrom) for node in ast.walk(module))
    graph = {
        "glm4voice.llm.engine": {"glm4voice.server.app", "glm4voice.defaults"},
        "glm4voice.server.app": {"glm4voice.web.page", "glm4voice.llm"},
        "glm4voice.defaults": set(),
    }
    assert violations(graph) == [
        "glm4voice.llm.engine imports glm4voice.server.app (llm must not import server)",
        "glm4voice.server.app imports glm4voice.web.page (server must not import web)",
    ]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None
    assert matches("glm4voice.server.app", "server") and not matches("glm4voice.serving", "server")
