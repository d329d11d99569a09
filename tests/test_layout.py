"""The package layout: the data flow's layers, no import cycles, no private names across
modules, no outside design file.

Walks every module of `ia3_jax` (and the `tasks/` package shipped as
`ia3_jax.tasks`) with `ast`, including imports inside functions, so a lazy
import cannot hide a cycle. Run it alone with `pytest tests/test_layout.py`.
"""

from __future__ import annotations

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"ia3_jax": REPO / "ia3_jax", "ia3_jax.tasks": REPO / "tasks"}

def _modules() -> dict[str, pathlib.Path]:
  found = {}
  for package, root in PACKAGE_DIRS.items():
    for path in root.rglob("*.py"):
      rel = path.relative_to(root).with_suffix("")
      parts = [p for p in rel.parts if p != "__init__"]
      found[".".join([package, *parts])] = path
  return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
  """The ia3_jax module that `name` (a module or a name inside one) lives in."""
  while name:
    if name in MODULES:
      return name
    name = name.rpartition(".")[0]
  return None


def _imports(module: str) -> list[tuple[str, str, int]]:
  """(imported module, imported name or "", line) for every ia3_jax import of `module`."""
  tree = ast.parse(MODULES[module].read_text())
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(a.name, "", node.lineno) for a in node.names if a.name.startswith("ia3_jax")]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module.startswith("ia3_jax"):
        for a in node.names:
          full = f"{node.module}.{a.name}"
          target = full if full in MODULES else node.module
          out.append((target, "" if full in MODULES else a.name, node.lineno))
  return out


def _graph() -> dict[str, set[str]]:
  graph = {}
  for module in MODULES:
    deps = {_resolve(target) for target, _, _ in _imports(module)}
    graph[module] = {d for d in deps if d and d != module
                     and not (module.startswith(d + ".") and d in PACKAGE_DIRS)}
  return graph


def test_no_import_cycles():
  graph, state, cycles = _graph(), {}, []

  def visit(node: str, stack: list[str]) -> None:
    state[node] = "open"
    for dep in sorted(graph.get(node, ())):
      if state.get(dep) == "open":
        cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
      elif dep not in state:
        visit(dep, stack + [dep])
    state[node] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  assert not cycles, "import cycles:\n" + "\n".join(cycles)


# The layers of the data flow, bottom up (docs/design.md): a module imports only from its own
# layer or the ones below. Everything not listed (cli, main, runs, demo, costs, gin_configurables,
# the package itself and the built-in tasks) is an entry point, on top.
LAYERS = {"ia3_jax.errors": 0, "ia3_jax.files": 0, "ia3_jax.runtime": 0, "ia3_jax.model": 1, "ia3_jax.peft": 2,
          "ia3_jax.interop": 3, "ia3_jax.data": 4, "ia3_jax.objectives": 5, "ia3_jax.train": 6}
ENTRY = max(LAYERS.values()) + 1


def _layer(module: str) -> int:
  for prefix in sorted(LAYERS, key=len, reverse=True):
    if module == prefix or module.startswith(prefix + "."):
      return LAYERS[prefix]
  return ENTRY


def test_modules_import_only_their_layer_or_below():
  upward = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
            for m, deps in sorted(_graph().items()) for d in sorted(deps) if _layer(d) > _layer(m)]
  assert not upward, "imports against the data flow:\n" + "\n".join(upward)


def test_every_library_module_sits_in_a_layer():
  entry_points = {"ia3_jax", "ia3_jax.cli", "ia3_jax.main", "ia3_jax.runs", "ia3_jax.demo",
                  "ia3_jax.costs", "ia3_jax.gin_configurables"}
  loose = sorted(m for m in MODULES if _layer(m) == ENTRY and m not in entry_points
                 and not m.startswith("ia3_jax.tasks"))
  assert not loose, f"modules outside the layers (add them to a subpackage): {loose}"


def test_no_private_names_across_modules():
  private = []
  for module in MODULES:
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    aliases = {}
    for target, name, line in _imports(module):
      shown = name or target.rpartition(".")[2]
      if shown.startswith("_") and not shown.startswith("__"):
        private.append(f"{path.relative_to(REPO)}:{line} imports {target} {name}".strip())
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ia3_jax"):
        for a in node.names:
          if f"{node.module}.{a.name}" in MODULES:
            aliases[a.asname or a.name] = f"{node.module}.{a.name}"
      elif isinstance(node, ast.Import):
        for a in node.names:
          if a.asname and a.name in MODULES:
            aliases[a.asname] = a.name
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in aliases and node.attr.startswith("_")
          and not node.attr.startswith("__") and aliases[node.value.id] != module):
        private.append(f"{path.relative_to(REPO)}:{node.lineno} uses "
                       f"{aliases[node.value.id]}.{node.attr}")
  assert not private, "private names used across modules:\n" + "\n".join(private)


def test_no_reference_to_a_design_file_outside_the_repository():
  import subprocess
  outside = ["DESIGN" + ".md", "../" + "shared"]  # split so this file does not match itself
  out = subprocess.run(["git", "grep", "-n", "-I", "-e", outside[0], "-e", outside[1]],
                       cwd=REPO, capture_output=True, text=True)
  hits = out.stdout.splitlines()
  assert not hits, "\n".join(hits)
