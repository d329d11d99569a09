"""One-off migration (architecture issue, step 8): regroup the flat modules into subpackages.

Moves the modules (git mv), rewrites `from ia3_jax... import` lines (Python and gin files),
dotted `ia3_jax.x` names in code and docs, and attribute uses of renamed modules. Run it after
the trainer/data splits, then delete it:  python scripts/regroup_layout.py . [--dry]
"""
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(sys.argv[1])
DRY = "--dry" in sys.argv

# old module (relative to ia3_jax) -> new module
MOVES = {
    "config": "model.config", "layers": "model.layers", "network": "model.network",
    "params": "model.params", "generation": "model.generation",
    "banks": "peft.banks", "ia3": "peft.ia3",
    "peft_methods.bitfit": "peft.bitfit", "peft_methods.layernorm": "peft.layernorm",
    "peft_methods.lora": "peft.lora", "peft_methods.prompt_tuning": "peft.prompt_tuning",
    "peft_methods.prefix_tuning": "peft.prefix_tuning", "peft_methods.full": "peft.full",
    "peft_methods.projection_targets": "peft.projection_targets", "peft_methods.registry": "peft.registry",
    "peft_methods.counts": "peft.counts",
    "checkpoints": "interop.hf_checkpoints", "adapter_files": "interop.adapter_files",
    "ia3_adapters": "interop.ia3_adapters", "peft_methods.lora_io": "interop.lora_adapters",
    "features": "data.features", "sources": "data.sources", "templates": "data.templates",
    "fewshot": "data.fewshot", "feature_converters": "data.feature_converters",
    "synthetic": "data.synthetic", "registration": "data.registration", "batches": "data.batches",
    "losses": "objectives.losses", "scoring": "objectives.scoring", "metrics": "objectives.metrics",
    "train_state": "train.train_state", "optimizers": "train.optimizers",
    "partitioning": "train.partitioning", "checkpointing": "train.checkpointer",
    "trainer": "train.trainer", "loop": "train.loop", "writers": "train.writers",
    "preemption": "train.preemption", "checks": "train.checks",
}
PACKAGES = {"peft_methods": "peft"}  # old package -> new package (its __init__ names)
NEW_PACKAGES = ["model", "peft", "interop", "data", "objectives", "train"]
PKG_DOC = {
    "model": "The T5X-compatible T5 network, its config, param-tree utilities and decoding.",
    "interop": "Files of other projects: HF model directories, orbax params, peft and T-Few adapters.",
    "data": "From raw examples to batches: sources, few-shot samples, templates, seqio tasks, converters.",
    "objectives": "What training minimises and evaluation reports: T-Few losses, rank classification, metrics.",
    "train": "The jitted train step, the one training loop and its hooks, state, checkpoints, partitioning.",
}
TEXT_GLOBS = ["ia3_jax/**/*.py", "tasks/**/*.py", "tests/**/*.py", "benchmarks/**/*.py",
              "scripts/**/*.py", "scripts/*.sh", "notebooks/build_notebooks.py", "examples/**/*.py",
              "gin/**/*.gin", "README.md", "docs/*.md", "examples/**/*.md", "setup.py",
              "examples/**/*.gin"]

IMPORT_RE = re.compile(
    r"^(?P<indent>[ \t]*)from ia3_jax(?P<mod>(?:\.[\w]+)*) import (?P<names>\([^)]*\)|[^\n#]+)",
    re.M)


def new_location(old: str) -> str | None:
  return MOVES.get(old)


def split_names(text: str) -> list[tuple[str, str | None]]:
  text = text.strip().strip("()")
  out = []
  for part in text.replace("\n", " ").split(","):
    part = part.strip()
    if not part:
      continue
    bits = part.split()
    out.append((bits[0], bits[2] if len(bits) == 3 and bits[1] == "as" else None))
  return out


def fmt(indent: str, module: str, names: list[tuple[str, str | None]]) -> str:
  body = ", ".join(n if a is None else f"{n} as {a}" for n, a in names)
  line = f"{indent}from ia3_jax{('.' + module) if module else ''} import {body}"
  if len(line) > 100 and len(names) > 1:
    return "\n".join(fmt(indent, module, [n]) for n in names)
  return line


def rewrite_imports(text: str, renames: dict[str, str]) -> str:
  def repl(m: re.Match) -> str:
    indent, mod, names = m.group("indent"), m.group("mod").lstrip("."), split_names(m.group("names"))
    trailing = m.group("names")[len(m.group("names").rstrip()):]
    groups: dict[str, list] = {}
    order = []

    def add(module: str, item):
      if module not in groups:
        groups[module] = []
        order.append(module)
      groups[module].append(item)

    if mod == "":
      for name, alias in names:
        new = new_location(name) or (PACKAGES.get(name) and PACKAGES[name])
        if new is None:
          add("", (name, alias))
          continue
        parent, _, leaf = new.rpartition(".")
        if name in PACKAGES:
          parent, leaf = "", PACKAGES[name]
        if alias is None and leaf != name:
          renames[name] = leaf
        if name == "params" and alias in ("P", None):
          renames[alias or "params"] = "params_lib" if alias else "params"
          alias = "params_lib" if alias else None
        add(parent, (leaf, alias))
    elif mod in MOVES:
      groups[MOVES[mod]] = names
      order.append(MOVES[mod])
    elif mod in PACKAGES:
      for name, alias in names:
        sub = f"{mod}.{name}"
        if sub in MOVES:
          parent, _, leaf = MOVES[sub].rpartition(".")
          if alias is None and leaf != name:
            renames[name] = leaf
          add(parent, (leaf, alias))
        else:
          add(PACKAGES[mod], (name, alias))
    else:
      return m.group(0)
    return "\n".join(fmt(indent, g, groups[g]) for g in order) + trailing

  return IMPORT_RE.sub(repl, text)


def dotted(text: str) -> str:
  keys = sorted(list(MOVES) + list(PACKAGES), key=len, reverse=True)
  pattern = re.compile(r"ia3_jax\.(" + "|".join(re.escape(k) for k in keys) + r")(?![\w])")

  def repl(m):
    k = m.group(1)
    return "ia3_jax." + (MOVES.get(k) or PACKAGES[k])
  return pattern.sub(repl, text)


def rename_attrs(text: str, renames: dict[str, str]) -> str:
  for old, new in renames.items():
    if old == new:
      continue
    text = re.sub(rf"(?<![\w.]){re.escape(old)}\.(?=[A-Za-z_])", f"{new}.", text)
  return text


LINE_RE = re.compile(r"^([ \t]*)from (ia3_jax[\w.]*) import ([^()\n#]+)$")


def tidy_imports(text: str, merge: bool = True) -> str:
  """Sorts each run of one-line `from ia3_jax... import` lines and merges plain same-module ones."""
  lines, out, i = text.split("\n"), [], 0
  while i < len(lines):
    m = LINE_RE.match(lines[i])
    if not m:
      out.append(lines[i])
      i += 1
      continue
    run = []
    while i < len(lines) and (m := LINE_RE.match(lines[i])) and (not run or m.group(1) == run[0][0]):
      run.append((m.group(1), m.group(2), m.group(3).strip()))
      i += 1
    merged: dict[str, set] = {}
    aliased = []
    for indent, mod, names in run:
      items = split_names(names)
      if merge and all(a is None for _, a in items):
        merged.setdefault(mod, set()).update(n for n, _ in items)
      else:
        aliased.append((mod, names))
    entries = [(mod, ", ".join(sorted(ns))) for mod, ns in merged.items()] + aliased
    for mod, names in sorted(set(entries)):
      line = f"{run[0][0]}from {mod} import {names}"
      if len(line) > 100:
        for n in names.split(", "):
          out.append(f"{run[0][0]}from {mod} import {n}")
      else:
        out.append(line)
  return "\n".join(out)


def git(*args):
  print("git", *args)
  if not DRY:
    subprocess.run(["git", *args], cwd=ROOT, check=True)


DATA_FACADE = '''"""From raw examples to batches: sources, few-shot samples, templates, seqio tasks, converters.

The data API in one namespace, each name from its home module (imported on first use, so
that `ia3_jax.data.sources` and friends load without seqio and TensorFlow):

    from ia3_jax import data
    data.register_task("my_task", {"train": "train.jsonl"}, "templates.yaml")
    batches = data.get_batches("my_task_fewshot_seed0", "train", 8, lengths)
"""

import importlib
from typing import Any

_HOMES = {
    **{name: "batches" for name in (
        "BatchIterator", "BatchSource", "SeqioBatches", "get_batches", "op_error_message",
        "truncation_report")},
    **{name: "registration" for name in (
        "FIRST_USER_TASK_ID", "RUN_MODEL_MACRO", "SPM_PATH_ENV", "DatasetSpec", "ModelVocabulary",
        "Registered", "RenderedSource", "TaskInfo", "add_mixture", "clear_cache",
        "default_vocabulary", "get_task_info", "lookup", "output_features", "register_dataset",
        "register_task", "register_task_id", "registered_names", "rendered_examples",
        "resolve_default_vocabulary", "run_model_path", "select_first_template",
        "select_random_template", "set_default_vocabulary", "task_id", "task_ids",
        "tokenize_prompted")},
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
  home = _HOMES.get(name)
  if home is None:
    raise AttributeError(f"module 'ia3_jax.data' has no attribute {name!r}")
  value = getattr(importlib.import_module(f"ia3_jax.data.{home}"), name)
  globals()[name] = value
  return value
'''


def move_files():
  for pkg in NEW_PACKAGES:
    d = ROOT / "ia3_jax" / pkg
    if not DRY:
      d.mkdir(exist_ok=True)
  for old, new in MOVES.items():
    src = ROOT / "ia3_jax" / (old.replace(".", "/") + ".py")
    dst = ROOT / "ia3_jax" / (new.replace(".", "/") + ".py")
    if src.exists():
      git("mv", str(src.relative_to(ROOT)), str(dst.relative_to(ROOT)))
    else:
      print("missing", src)
  # the old package's __init__ becomes the new package's
  init = ROOT / "ia3_jax/peft_methods/__init__.py"
  if init.exists():
    git("mv", "ia3_jax/peft_methods/__init__.py", "ia3_jax/peft/__init__.py")
  git("rm", "-q", "ia3_jax/data.py")  # the flat facade: the package's __init__ replaces it
  if not DRY:
    (ROOT / "ia3_jax/data/__init__.py").write_text(DATA_FACADE)
  for pkg in NEW_PACKAGES:
    f = ROOT / "ia3_jax" / pkg / "__init__.py"
    if not f.exists() and not DRY:
      f.write_text(f'"""{PKG_DOC[pkg]}"""\n')


def rewrite_texts():
  files = set()
  for g in TEXT_GLOBS:
    files.update(p for p in ROOT.glob(g) if p.is_file() and ".git" not in p.parts)
  for path in sorted(files):
    text = path.read_text()
    renames: dict[str, str] = {}
    new = rewrite_imports(text, renames)
    new = dotted(new)
    new = rename_attrs(new, renames)
    if path.suffix in (".py", ".gin"):
      new = tidy_imports(new, merge=path.suffix == ".py")
    if new != text:
      print("rewrote", path.relative_to(ROOT), renames or "")
      if not DRY:
        path.write_text(new)


if __name__ == "__main__":
  move_files()
  rewrite_texts()
