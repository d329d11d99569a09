"""`python -m ia3_jax.main`: the T5X-style gin entry point (train, eval, score, infer).

    python -m ia3_jax.main \\
      --gin_file=models/t0_3b.gin --gin_file=recipes/t_few.gin \\
      --gin_file=peft/ia3.gin --gin_file=runs/finetune.gin \\
      --gin.MODEL_DIR=\\"/tmp/rte_ia3\\" \\
      --gin.MIXTURE_OR_TASK_NAME=\\"rte_fewshot_seed0\\" \\
      --gin.INITIAL_CHECKPOINT_PATH=\\"/ckpt/T0_3B\\"

Gin files are parsed in order (later bindings win), then `--gin.KEY=VALUE`
and `--gin_bindings` in order. Files are looked up as given, then in every
`--gin_search_paths` entry, then in the gin files shipped with the package
(`ia3_jax/gin`: models/, recipes/, peft/, runs/). The run file binds
`gin_configurables.run.action`; this module calls it.

Errors in the configuration exit with status 2 and a message naming the gin
file (and line) concerned: gin's own message for an unknown configurable or
parameter, plus where a missing or required macro is used.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from typing import Optional, Sequence

from ia3_jax.errors import ConfigError

log = logging.getLogger("ia3_jax")

# The run file each CLI action needs (ia3-jax train/eval/score/infer).
RUN_FILES = {"train": "runs/finetune.gin", "eval": "runs/eval.gin", "score": "runs/score.gin",
             "infer": "runs/infer.gin"}


class GinConfigError(ConfigError):
  """A gin configuration problem, with the file that needs fixing."""


# --------------------------------------------------------------------------- flags


def build_parser(prog: str = "python -m ia3_jax.main") -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog=prog, description="Train / evaluate T5 models with (IA)^3 and the T-Few recipe "
      "from gin files (T5X conventions). Extra flags --gin.KEY=VALUE set one gin binding each.")
  p.add_argument("--gin_file", action="append", default=[],
                 help="gin file to parse; repeat for several (parsed in order)")
  p.add_argument("--gin_search_paths", action="append", default=[],
                 help="comma-separated directories to look for gin files in (before the "
                      "shipped ones)")
  p.add_argument("--gin_bindings", action="append", default=[],
                 help="a gin binding such as 'MODEL_DIR = \"/tmp/x\"'; repeatable")
  p.add_argument("--data_parallel", type=int, default=None,
                 help="size of the mesh's data axis (-1: all devices left)")
  p.add_argument("--model_parallel", type=int, default=None,
                 help="size of the mesh's model axis (T5X num_partitions)")
  p.add_argument("--multiprocess", action="store_true",
                 help="join a multi-process run (jax.distributed.initialize); with no "
                      "coordinator flags JAX auto-detects the cluster (Cloud TPU, SLURM)")
  p.add_argument("--coordinator_address", default=None, help="host:port of process 0")
  p.add_argument("--num_processes", type=int, default=None)
  p.add_argument("--process_id", type=int, default=None)
  p.add_argument("--cpu_collectives", default="gloo",
                 help="cross-process collectives on CPU (gloo or mpi)")
  p.add_argument("--print_config", action="store_true",
                 help="print the parsed gin configuration and exit")
  p.add_argument("--log_level", default="INFO")
  return p


def split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--gin.KEY=VALUE` (or `--gin.KEY VALUE`) flags from the others."""
  rest, bindings = [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--gin.") :
      body = arg[len("--gin."):]
      if "=" not in body:
        if i + 1 >= len(argv):
          raise GinConfigError(f"flag {arg} has no value (use --gin.KEY=VALUE)")
        body = f"{body}={argv[i + 1]}"
        i += 1
      key, value = body.split("=", 1)
      bindings.append(f"{key} = {value}")
    else:
      rest.append(arg)
    i += 1
  return rest, bindings


# --------------------------------------------------------------------------- gin files


def search_paths(extra: Sequence[str]) -> list[str]:
  from ia3_jax import gin_configurables
  paths = [p for entry in extra for p in entry.split(",") if p]
  return [os.path.abspath(p) for p in paths] + [gin_configurables.gin_dir()]


def resolve_gin_file(name: str, paths: Sequence[str]) -> str:
  if os.path.isabs(name) or os.path.exists(name):
    if not os.path.exists(name):
      raise GinConfigError(f"gin file {name} does not exist")
    return os.path.abspath(name)
  for root in paths:
    candidate = os.path.join(root, name)
    if os.path.exists(candidate):
      return candidate
  raise GinConfigError(f"gin file {name!r} not found in the current directory or the search "
                       f"paths {list(paths)}; shipped files: {', '.join(shipped_gin_files())}")


def shipped_gin_files() -> list[str]:
  from ia3_jax import gin_configurables
  root = gin_configurables.gin_dir()
  out = []
  for dirpath, _, files in os.walk(root):
    for f in files:
      if f.endswith(".gin"):
        out.append(os.path.relpath(os.path.join(dirpath, f), root))
  return sorted(out)


_INCLUDE = re.compile(r"""^\s*include\s+['"]([^'"]+)['"]""")


def _with_includes(files: Sequence[str], paths: Sequence[str]) -> list[str]:
  out: list[str] = []

  def visit(path: str) -> None:
    if path in out:
      return
    out.append(path)
    with open(path) as f:
      for line in f:
        m = _INCLUDE.match(line)
        if m:
          try:
            visit(resolve_gin_file(m.group(1), [os.path.dirname(path), *paths]))
          except GinConfigError:
            pass
  for f in files:
    visit(f)
  return out


def _matching_lines(pattern: re.Pattern, files: Sequence[str]) -> list[str]:
  """'file:line: text' for every line of `files` that `pattern` finds."""
  found = []
  for path in files:
    with open(path) as f:
      found += [f"{path}:{i}: {line.strip()}" for i, line in enumerate(f, 1)
                if pattern.search(line)]
  return found


def _uses(name: str, files: Sequence[str], bindings: Sequence[str]) -> list[str]:
  """Every line (and --gin binding) that references macro %name."""
  pattern = re.compile(r"%" + re.escape(name) + r"\b")
  return _matching_lines(pattern, files) + [f"--gin binding: {b}" for b in bindings
                                            if pattern.search(b)]


def _definitions(name: str, files: Sequence[str]) -> list[str]:
  return _matching_lines(re.compile(r"^\s*" + re.escape(name) + r"\s*="), files)


def explain_gin_error(error: Exception, files: Sequence[str], bindings: Sequence[str]) -> str:
  """gin's message (first lines), plus the gin file(s) that need the missing value."""
  text = str(error)
  head = text.split(" in config string:")[0].strip()
  lines = [head]
  m = re.search(r"No bindings specified for '([^'/]+)/gin\.macro'", text)
  if m:
    name = m.group(1)
    uses = _uses(name, files, bindings)
    lines.append(f"macro {name} is not defined; it is used by:")
    lines += [f"  {u}" for u in uses] or ["  (no gin file; a --gin binding?)"]
    lines.append(f"define it with --gin.{name}=VALUE or include a gin file that sets it "
                 "(models/*.gin, recipes/*.gin, peft/*.gin)")
    return "\n".join(lines)
  m = re.search(r"^(\S+?)/macro\.value set to `%gin\.REQUIRED`", text)
  if m:
    name = m.group(1)
    lines.append(f"macro {name} is required by:")
    lines += [f"  {d}" for d in _definitions(name, files)]
    lines += [f"  {u}" for u in _uses(name, files, bindings)]
    lines.append(f"set it with --gin.{name}=VALUE")
    return "\n".join(lines)
  m = re.search(r"Required bindings for `([^`]+)` not provided in config: \[(.*)\]", text)
  if m:
    lines.append(f"gin files parsed: {', '.join(files) or '(none)'}; bind the parameters above "
                 f"(e.g. --gin.{m.group(1)}.{m.group(2).split(',')[0].strip(chr(39))}=...)")
  elif "In file" not in text and "bindings string" not in text:
    lines.append(f"gin files parsed: {', '.join(files) or '(none)'}")
  return "\n".join(lines)


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str],
              extra_search_paths: Sequence[str] = ()) -> list[str]:
  """Parses gin files (resolved against the search paths) and bindings; returns the files."""
  import gin
  gin.clear_config()
  paths = search_paths(extra_search_paths)
  for p in paths:
    gin.add_config_file_search_path(p)
  files = [resolve_gin_file(f, paths) for f in gin_files]
  all_files = _with_includes(files, paths)
  try:
    gin.parse_config_files_and_bindings(files, bindings, finalize_config=True)
  except (ValueError, KeyError, TypeError, OSError, SyntaxError) as e:
    raise GinConfigError(explain_gin_error(e, all_files, bindings)) from e
  return all_files


def _ensure_run_file(files: list[str], action: Optional[str]) -> list[str]:
  if action is None:
    return files
  wanted = RUN_FILES[action]
  given = [f for f in files if re.search(r"(^|/)runs/[^/]+\.gin$", f.replace(os.sep, "/"))]
  other = [f for f in given if not f.replace(os.sep, "/").endswith(wanted)]
  if other:
    raise GinConfigError(f"ia3-jax {action}: gin file {other[0]} is another run's file; "
                         f"{action} uses {wanted}")
  return files if given else files + [wanted]


# --------------------------------------------------------------------------- main


def _init_processes(args: argparse.Namespace) -> None:
  if not (args.multiprocess or args.coordinator_address or args.num_processes):
    return
  from ia3_jax import partitioning
  partitioning.initialize_distributed(args.coordinator_address, args.num_processes,
                                      args.process_id, cpu_collectives=args.cpu_collectives)


def main(argv: Optional[Sequence[str]] = None, *, action: Optional[str] = None,
         prog: str = "python -m ia3_jax.main") -> int:
  """Parses flags and gin, runs the configured action. Returns the exit status."""
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser(prog)
  try:
    rest, gin_flag_bindings = split_gin_flags(argv)
  except GinConfigError as e:
    parser.error(str(e))
  args = parser.parse_args(rest)
  level = getattr(logging, args.log_level.upper(), logging.INFO)
  logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  if level > logging.DEBUG:  # orbax / seqio / jax backend chatter
    for name in ("absl", "jax"):
      logging.getLogger(name).setLevel(max(level, logging.WARNING))
  bindings = list(args.gin_bindings) + gin_flag_bindings
  if args.data_parallel is not None:
    bindings.append(f"partitioning.PartitionConfig.data_parallel = {args.data_parallel}")
  if args.model_parallel is not None:
    bindings.append(f"partitioning.PartitionConfig.model_parallel = {args.model_parallel}")
  try:
    files = _ensure_run_file(list(args.gin_file), action)
    if not files:
      parser.error("no --gin_file given (e.g. --gin_file=runs/finetune.gin)")
    _init_processes(args)
    import gin
    from ia3_jax import gin_configurables
    parsed = parse_gin(files, bindings, args.gin_search_paths)
    if args.print_config:
      print(gin.config_str())
      return 0
    try:
      gin.get_configurable(gin_configurables.run)()
    except (RuntimeError, ValueError) as e:
      if "Required bindings" in str(e) or "gin.REQUIRED" in str(e):
        raise GinConfigError(explain_gin_error(e, parsed, bindings)) from e
      raise
  except GinConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Exception as e:  # a failed run: a one-line reason, the traceback in the log
    from ia3_jax.checkpoints import CheckpointError
    from ia3_jax.trainer import TrainingDivergedError
    if isinstance(e, (TrainingDivergedError, CheckpointError)):
      log.debug("run failed", exc_info=True)
      print(f"error: {e}", file=sys.stderr)
      return 1
    raise
  return 0


if __name__ == "__main__":
  sys.exit(main())
