"""The package layout: the data flow's layers, no import cycles, no private names across
modules, no outside design file.

Walks every module of `ia3_jax` (and the `tasks/` package shipped as
`ia3_jax.tasks`) with `ast`, including imports inside functions, so a lazy
import cannot hide a cycle. Run it alone with `pytest tests/test_layout.py`.
"""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"ia3_jax": REPO / "ia3_jax"}

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
  outside = ["DESIGN" + ".md", "../" + "shared"]  # split so this file does not match itself
  out = subprocess.run(["git", "grep", "-n", "-I", "-e", outside[0], "-e", outside[1]],
                       cwd=REPO, capture_output=True, text=True)
  hits = out.stdout.splitlines()
  assert not hits, "\n".join(hits)


# --------------------------------------------------------------------------- names in the docs

# Folders shipped inside the package from elsewhere in the repository (setup.py).
SHIPPED_AS = {"ia3_jax/gin": "gin"}
_PATH = re.compile(r"(?<![\w./-])ia3_jax/[\w./-]*[\w]")
_MODULE = re.compile(r"(?<![\w./-])ia3_jax(?:\.[A-Za-z_]\w*)+")


def _documents() -> dict[str, str]:
  """The text of README, docs, benchmarks' reports, gin files, and every module's docstrings
  and comments (the whole source: a stale name in a comment misleads as much)."""
  out = subprocess.run(["git", "ls-files", "*.md", "*.gin", "*.py"], cwd=REPO,
                       capture_output=True, text=True, check=True).stdout.split()
  return {f: (REPO / f).read_text() for f in out
          if not f.startswith("tests/") and (REPO / f).exists()}


def _source_path(name: str) -> pathlib.Path:
  for shipped, source in SHIPPED_AS.items():
    if name == shipped or name.startswith(shipped + "/"):
      return REPO / (source + name[len(shipped):])
  return REPO / name


def _top_level_names(module: str) -> set[str]:
  tree = ast.parse(MODULES[module].read_text())
  names: set[str] = set()
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      names.add(node.name)
    elif isinstance(node, (ast.Assign, ast.AnnAssign)):
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
      names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      names |= {(a.asname or a.name).split(".")[0] for a in node.names}
  package_dir = MODULES[module].parent if MODULES[module].name == "__init__.py" else None
  if package_dir is not None:  # a package's submodules and lazily exported names
    names |= {p.stem for p in package_dir.glob("*.py")} | {p.name for p in package_dir.iterdir()
                                                          if p.is_dir()}
    names |= set(re.findall(r'"(\w+)"', MODULES[module].read_text()))
  return names


def _stale_name(name: str) -> str | None:
  """Why the dotted `ia3_jax....` name does not exist, or None if it does."""
  if name.split(".")[:2] == ["ia3_jax", "gin"]:  # package data (the gin files), not a module
    return None if _source_path(name.replace(".", "/")).exists() else "no such gin folder"
  parts = name.split(".")
  for i in range(len(parts), 0, -1):
    module = ".".join(parts[:i])
    if module in MODULES:
      rest = parts[i:]
      if rest and rest[0] not in _top_level_names(module):
        return f"{module} has no {rest[0]!r}"
      return None
  return "no such module"


def test_paths_and_modules_named_in_docs_and_docstrings_exist():
  stale = []
  for file, text in _documents().items():
    for line_no, line in enumerate(text.splitlines(), 1):
      for name in _PATH.findall(line):
        if not _source_path(name.rstrip(".")).exists():
          stale.append(f"{file}:{line_no}: path {name} does not exist")
      for name in _MODULE.findall(line):
        why = _stale_name(name)
        if why:
          stale.append(f"{file}:{line_no}: {name}: {why}")
  assert not stale, "stale names:\n" + "\n".join(stale)


def test_the_name_checker_tells_stale_names_from_real_ones():
  assert _stale_name("ia3_jax.peft.banks.AdapterBank") is None
  assert _stale_name("ia3_jax.data.register_task") is None  # a lazily exported name
  assert _stale_name("ia3_jax.train.run_lock") is None
  assert _stale_name("ia3_jax.synthetic") == "ia3_jax has no 'synthetic'"
  assert _stale_name("ia3_jax.peft.banks.NoSuchBank") == "ia3_jax.peft.banks has no 'NoSuchBank'"
  assert not _source_path("ia3_jax/synthetic.py").exists()
  assert _source_path("ia3_jax/gin/recipes/t_few.gin").exists()
