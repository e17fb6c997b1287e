"""Ray stays optional: no module outside glm4voice/serve/ imports it (lazy imports included), so the
demo, model_server.py and web_demo.py run where ray is not installed."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imports_ray(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        if any(name == "ray" or name.startswith("ray.") for name in names):
            return True
    return False


def test_only_the_serve_package_imports_ray():
    sources = [ROOT / name for name in ("model_server.py", "web_demo.py", "flow_inference.py")]
    for package in ("glm4voice", "cosyvoice", "speech_tokenizer"):
        sources += sorted((ROOT / package).rglob("*.py"))
    users = sorted(str(p.relative_to(ROOT)) for p in sources if imports_ray(p))
    assert users and all(user.startswith("glm4voice/serve/") for user in users), users
    assert "glm4voice/serve/config.py" not in users  # plain data
