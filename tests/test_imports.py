"""The package's import graph: arrows point one way and never close a circle.

``kernels <- models <- training <- experiments``, with ``data`` below ``models`` and ``training``
(DESIGN.md). Every ``import`` in every module counts, function-level ones too: a lazy import that
closes a circle is still a circle. Parsed with ``ast``, nothing is imported.
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What each top-level folder may import (besides itself).
ALLOWED = {
  "kernels": set(),
  "data": set(),
  "models": {"kernels", "data"},
  "training": {"kernels", "data", "models"},
  "configs": {"models"},
  "experiments": {"kernels", "data", "models", "training", "configs"},
}


def _modules() -> dict[str, str]:
  """Dotted module name -> file, for every library module (tests excluded)."""
  out = {}
  for top in ALLOWED:
    for root, dirs, files in os.walk(os.path.join(REPO, top)):
      dirs[:] = [d for d in dirs if d != "__pycache__"]
      for f in files:
        if f.endswith(".py"):
          rel = os.path.relpath(os.path.join(root, f), REPO)[:-3].split(os.sep)
          if rel[-1] == "__init__":
            rel = rel[:-1]
          out[".".join(["flaxseed"] + rel)] = os.path.join(root, f)
  return out


def _imports(path: str, modules) -> set[str]:
  """The flaxseed modules a file imports (``from pkg import mod`` names the module)."""
  out = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.startswith("flaxseed"))
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flaxseed"):
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        out.add(sub if sub in modules else node.module)
  return {m for m in out if m != "flaxseed"}


@pytest.fixture(scope="module")
def graph():
  modules = _modules()
  return {m: _imports(path, modules) for m, path in modules.items()}


def _top(module: str) -> str:
  return module.split(".")[1]


def upward(graph) -> list[str]:
  return sorted(
    f"{m} -> {dep}"
    for m, deps in graph.items()
    for dep in deps
    if _top(dep) != _top(m) and _top(dep) not in ALLOWED[_top(m)]
  )


def cycles(graph) -> list[str]:
  found, state = [], {}  # state: 1 on the current path, 2 done

  def visit(m, path):
    state[m] = 1
    for dep in sorted(graph.get(m, ())):
      if state.get(dep) == 1:
        found.append(" -> ".join(path[path.index(dep) :] + [dep]))
      elif dep in graph and not state.get(dep):
        visit(dep, path + [dep])
    state[m] = 2

  for m in sorted(graph):
    if not state.get(m):
      visit(m, [m])
  return found


def test_imports_point_down_the_layers(graph):
  bad = upward(graph)
  assert not bad, "imports against the layering (DESIGN.md):\n  " + "\n  ".join(bad)


def test_no_import_cycles(graph):
  bad = cycles(graph)
  assert not bad, "import cycles:\n  " + "\n  ".join(bad)


def test_the_checks_see_what_they_guard(graph):
  """The graph is the real one (a parser that saw nothing would pass), and both checks catch
  what they are for."""
  assert "flaxseed.data.tokenizers" in graph["flaxseed.models.hf"]
  assert "flaxseed.training.tasks.base" in graph["flaxseed.training.tasks.lm"]
  assert "flaxseed.kernels" in graph["flaxseed.models.layers"]
  assert len(graph) > 50
  circle = {"flaxseed.models.a": {"flaxseed.models.b"}, "flaxseed.models.b": {"flaxseed.models.a"}}
  assert cycles(circle) == ["flaxseed.models.a -> flaxseed.models.b -> flaxseed.models.a"]
  assert upward({"flaxseed.models.hf": {"flaxseed.training.tokenizers"}}) == [
    "flaxseed.models.hf -> flaxseed.training.tokenizers"
  ]
