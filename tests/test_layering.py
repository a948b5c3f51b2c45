"""Imports point one way: model never imports train/inference/serve/parallel; kernels never import model."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "moesaic"

FORBIDDEN = {
    "model": ("moesaic.train", "moesaic.inference", "moesaic.serve", "moesaic.parallel", "moesaic.cli",
              "moesaic.commands", "moesaic.analysis", "moesaic.checkpoint", "moesaic.data"),
    "kernels": ("moesaic.model", "moesaic.train", "moesaic.inference", "moesaic.serve", "moesaic.parallel",
                "moesaic.checkpoint"),
}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_layering():
    bad = []
    for pkg, forbidden in FORBIDDEN.items():
        for f in (SRC / pkg).rglob("*.py"):
            for name in _imports(f):
                if name.startswith(forbidden):
                    bad.append(f"{f.relative_to(SRC)} imports {name}")
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_model_has_no_optimizer_or_distributed():
    for f in (SRC / "model").rglob("*.py"):
        text = f.read_text()
        assert "torch.distributed" not in text, f
        assert "torch.optim" not in text, f
