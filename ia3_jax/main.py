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
file (and line) or flag concerned: gin's own message for an unknown configurable
or parameter, plus where a missing or required macro is used; a `--gin.NAME`
macro that no gin file defines or reads; a value gin cannot parse. Every other
expected failure (`ia3_jax.errors.Ia3JaxError`: bad data, checkpoints, an
output directory that cannot be written) prints one line and exits 1; Ctrl-C
exits 130. `--verbose` (or IA3_JAX_VERBOSE=1) adds the traceback.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
import tempfile
import traceback
from typing import Callable, Optional, Sequence

from ia3_jax import files, runtime
from ia3_jax.errors import ConfigError, Ia3JaxError, TrainingInterrupted
from ia3_jax.train import host_memory  # stdlib only until applied: the parser stays light

log = logging.getLogger("ia3_jax")

# The run file each CLI action needs (ia3-jax train/eval/score/infer).
RUN_FILES = {"train": "runs/finetune.gin", "eval": "runs/eval.gin", "score": "runs/score.gin",
             "infer": "runs/infer.gin"}


# What each run kind writes to (checked before anything is loaded).
OUTPUT_MACROS = ("MODEL_DIR", "EVAL_OUTPUT_DIR", "INFER_OUTPUT_DIR")
VERBOSE_ENV = runtime.VERBOSE_ENV


class GinConfigError(ConfigError):
  """A gin configuration problem, with the file that needs fixing."""


# --------------------------------------------------------------------------- errors, noise


def pop_verbose(argv: Sequence[str]) -> tuple[list[str], bool]:
  """argv without `--verbose`, and whether tracebacks are wanted (flag or $IA3_JAX_VERBOSE)."""
  rest = [a for a in argv if a != "--verbose"]
  return rest, len(rest) < len(argv) or runtime.verbose_from_env()


def _one_line(error: BaseException) -> str:
  """The error's message without the call sites gin appends ("In call to configurable ...")."""
  lines = [l for l in str(error).splitlines() if not re.match(r"\s+In call to configurable", l)]
  return "\n".join(lines).strip() or type(error).__name__


def report_errors(fn: Callable[[], int], verbose: bool = False) -> int:
  """Runs an entry point; expected failures become one line on stderr and an exit status.

  `Ia3JaxError`: "error: <message>", status 1 (gin configuration errors: 2); a file-system
  failure (full disk, read-only or missing path: `files.environment_error_line`) likewise.
  `TrainingInterrupted` / Ctrl-C: one line, status 130; a preemption (SIGTERM) that
  saved its checkpoint: one line, status 0. Anything else is a bug and keeps its
  traceback. `verbose` prints the traceback of expected failures too.
  """
  try:
    return fn()
  except (TrainingInterrupted, KeyboardInterrupt) as e:
    if verbose:
      traceback.print_exc()
    step = getattr(e, "step", None)
    if getattr(e, "preempted", False):
      print(f"preempted ({e.signal_name}) at step {step}: checkpoint saved; the same command "
            "resumes", file=sys.stderr)
      return 0
    print(f"interrupted at step {step}; the same command resumes" if step is not None
          else "interrupted", file=sys.stderr)
    return 130
  except Ia3JaxError as e:
    if verbose:
      traceback.print_exc()
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return 2 if isinstance(e, GinConfigError) else 1
  except Exception as e:  # pylint: disable=broad-except
    line = files.environment_error_line(e)  # a full disk, a read-only or missing path
    if line is None:
      raise
    if verbose:
      traceback.print_exc()
    print(f"error: {line}", file=sys.stderr)
    return 1


class _DropOrbaxMetadataWarning(logging.Filter):
  """Orbax warns on every read of a checkpoint written without its metadata file."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Metadata file does not exist")


_ORBAX_FILTER = _DropOrbaxMetadataWarning()


def quiet_runtime(verbose: bool = False) -> None:
  """Silences start-up noise that is not the user's business (call before the heavy imports).

  TensorFlow's C++ logs (TF_CPP_MIN_LOG_LEVEL, unless set) and orbax's missing
  metadata warning; `verbose` keeps TensorFlow's logs.
  """
  if not verbose:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  for name in ("absl", "orbax"):
    logger = logging.getLogger(name)
    if _ORBAX_FILTER not in logger.filters:
      logger.addFilter(_ORBAX_FILTER)


def import_tensorflow_quietly(verbose: bool = False) -> None:
  """Imports TensorFlow (`runtime.import_tf`) before anything else does; `verbose` keeps its
  start-up logs."""
  runtime.import_tf(quiet=not verbose)


def check_writable(path: str, what: str) -> None:
  """Writes a probe file in directory `path` (or, while it does not exist, in its nearest
  existing parent: a run that fails later leaves no directory behind), or raises
  ConfigError naming `what`."""
  if "://" in path:  # gs:// and other remote filesystems: left to the writer
    return
  probe = files.nearest_existing(path)
  try:
    if not os.path.isdir(probe):
      raise NotADirectoryError(20, "Not a directory", probe)
    with tempfile.TemporaryFile(dir=probe):
      pass
  except OSError as e:
    raise ConfigError(f"{what}={path!r} is not a writable directory ({e.strerror or e}); "
                      f"set --gin.{what} to one you can write to") from None


def _check_outputs() -> None:
  import gin
  for name in OUTPUT_MACROS:
    try:
      value = gin.query_parameter(f"%{name}")
    except ValueError:
      continue
    if isinstance(value, str) and value:
      check_writable(value, name)


# --------------------------------------------------------------------------- flags


def build_parser(prog: str = "python -m ia3_jax.main",
                 action: Optional[str] = None) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog=prog, description="Train / evaluate T5 models with (IA)^3 and the T-Few recipe\n"
      "from gin files (T5X conventions). Extra flags --gin.KEY=VALUE set one gin binding each.",
      epilog=macro_help(action) if action else None,
      formatter_class=argparse.RawDescriptionHelpFormatter)
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
  p.add_argument("--num_processes", type=int, default=None,
                 help="number of processes of a multi-process run")
  p.add_argument("--process_id", type=int, default=None,
                 help="this process's index in a multi-process run (0 .. num_processes-1)")
  p.add_argument("--cpu_collectives", default="gloo",
                 help="cross-process collectives on CPU (gloo or mpi)")
  p.add_argument("--host_memory", choices=host_memory.MODES, default="reuse",
                 help="on CPU, reuse each step's host buffers instead of glibc mapping and "
                      "zeroing fresh pages every step (15-20%% of a t5-small step), at the "
                      "price of keeping freed memory in the process; 'system' leaves "
                      "malloc and JAX's dispatch as they are")
  p.add_argument("--print_config", action="store_true",
                 help="print the parsed gin configuration and exit")
  p.add_argument("--log_level", default="INFO", help="Python log level (DEBUG shows library "
                 "logs too)")
  p.add_argument("--verbose", action="store_true",
                 help=f"print the traceback of an error (also {VERBOSE_ENV}=1)")
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


# Parsed before the given files when one binds MODEL_CONFIG (a models/*.gin file): MODEL (the
# run's assembly.ModelSpec) and its defaults, which the files and the flags then override.
BASE_GIN_FILE = os.path.join("models", "base.gin")
_BINDS_MODEL_CONFIG = re.compile(r"^\s*MODEL_CONFIG\s*=")
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


# --------------------------------------------------------------------------- macros

_MACRO_DEF = re.compile(r"^([A-Z][A-Z0-9_]*)\s*=\s*(.*?)\s*(?:#\s*(.*))?$")
_MACRO_REF = re.compile(r"%([A-Z][A-Z0-9_]*)\b")


def gin_macros(path: str) -> tuple[dict[str, tuple[str, str]], list[str]]:
  """A gin file's top-level macro definitions {NAME: (value, comment)} and the macros it reads."""
  defined: dict[str, tuple[str, str]] = {}
  used: list[str] = []
  with open(path) as f:
    for line in f:
      if line.lstrip().startswith("#"):
        continue
      m = _MACRO_DEF.match(line)
      if m:
        defined.setdefault(m.group(1), (m.group(2), m.group(3) or ""))
      used += [u for u in _MACRO_REF.findall(line) if u not in used and u != "gin"]
  return defined, used


def macro_help(action: str) -> str:
  """The gin macros a run kind reads (its run file, then the recipe), with their defaults."""
  from ia3_jax import gin_configurables
  root = gin_configurables.gin_dir()
  run_file = RUN_FILES.get(action, "demo.gin")
  layers = [run_file] if run_file == "demo.gin" else [run_file, "recipes/t_few.gin"]
  tables = [gin_macros(os.path.join(root, f)) for f in layers]
  names = list(dict.fromkeys([*tables[0][0], *tables[0][1]]))
  required, optional = [], []
  for name in names:
    where = next(((f, d[name]) for f, (d, _) in zip(layers, tables) if name in d), None)
    if where is None:
      optional.append(f"  {name:<26} from {_defined_by(root, name)}")
    elif where[1][0] == "%gin.REQUIRED":
      required.append(f"  {name:<26} {where[1][1]}".rstrip())
    else:
      value, comment = where[1]
      note = f"  # {comment}" if comment else ""
      src = "" if where[0] == run_file else f"  ({where[0]})"
      optional.append(f"  {name:<26} = {value}{src}{note}")
  lines = [f"gin macros of ia3-jax {action} (set with --gin.NAME=VALUE; strings need "
           "inner quotes, e.g. --gin.MODEL_DIR=\"'/tmp/run'\"):"]
  if required:
    lines += ["required:", *required]
  lines += ["optional (default):", *optional]
  return "\n".join(lines)


def _defined_by(root: str, name: str) -> str:
  """Which shipped gin files define macro `name` ("models/*.gin", "peft/*.gin", ...)."""
  dirs = sorted({os.path.dirname(f) or "." for f in shipped_gin_files()
                 if name in gin_macros(os.path.join(root, f))[0]})
  return ", ".join(f"{d}/*.gin" for d in dirs) or "(no shipped file)"


class _AnyReference(object):
  """Stands for @configurable / %macro references while only the syntax of a value is checked."""


_GIN_REFERENCE = re.compile(r"[@%][A-Za-z_][\w./]*(\(\))?")


def duplicate_dict_keys(value: str) -> list:
  """Keys given twice in a dict literal of a gin value (e.g. `{'a': 1, 'a': 2}`), which gin,
  like Python, silently collapses to the last; [] when there are none or the value is not
  Python-like enough to tell."""
  import ast
  try:
    tree = ast.parse(_GIN_REFERENCE.sub("None", value), mode="eval")
  except SyntaxError:
    return []
  twice = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Dict):
      keys = [k.value for k in node.keys if isinstance(k, ast.Constant)]
      twice += [k for i, k in enumerate(keys) if k in keys[:i] and k not in twice]
  return twice


def check_gin_flags(bindings: Sequence[str], files: Sequence[str],
                    all_bindings: Sequence[str]) -> None:
  """Each `--gin.KEY=VALUE`: a value gin can parse, and (for a macro) one the gin files use.

  gin itself rejects an unknown configurable or parameter (`--gin.a.b=...`) but
  silently accepts a macro nothing reads (`--gin.TRAIN_STEP=5`).
  """
  from gin import config_parser

  class Delegate(config_parser.ParserDelegate):
    def configurable_reference(self, scoped_configurable_name, evaluate):
      return _AnyReference()

    def macro(self, macro_name):
      return _AnyReference()

  known: set[str] = set()
  for path in files:
    defined, used = gin_macros(path)
    known |= set(defined) | set(used)
  for b in all_bindings:
    known |= set(_MACRO_REF.findall(b))
  for binding in bindings:
    key, value = binding.split(" = ", 1)
    flag = f"--gin.{key}={value}"
    try:
      parser = config_parser.ConfigParser(binding, Delegate())
      parser.parse_statement()
      extra = parser.parse_statement()
    except Exception:  # SyntaxError, tokenize.TokenError, ValueError  # pylint: disable=broad-except
      extra = True
    if extra is not None:
      raise GinConfigError(f"{flag}: unable to parse value {value!r}; a string needs inner "
                           f"quotes: --gin.{key}=\"'{value}'\"") from None
    twice = duplicate_dict_keys(value)
    if twice:
      raise GinConfigError(f"{flag}: key {twice[0]!r} is given twice in a dict; gin keeps only "
                           "the last value, so give each key once")
    if re.fullmatch(r"[A-Za-z_]\w*", key) and key not in known:
      close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
      hint = f"; did you mean {', '.join(close)}?" if close else ""
      raise GinConfigError(f"{flag}: no gin file parsed defines or reads macro {key}{hint} "
                           f"(gin files: {', '.join(os.path.basename(f) for f in files)})")


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str],
              extra_search_paths: Sequence[str] = (),
              flag_bindings: Sequence[str] = ()) -> list[str]:
  """Parses gin files (resolved against the search paths) and bindings; returns the files.

  `models/base.gin` (the MODEL spec and its defaults) is parsed first when a file binds
  MODEL_CONFIG (a model preset). `flag_bindings` (those of `bindings` that came from --gin.KEY=VALUE flags) are
  checked first (`check_gin_flags`).
  """
  import gin
  gin.clear_config()
  paths = search_paths(extra_search_paths)
  for p in paths:
    gin.add_config_file_search_path(p)
  files = [resolve_gin_file(f, paths) for f in gin_files]
  if _matching_lines(_BINDS_MODEL_CONFIG, _with_includes(files, paths)):
    base = resolve_gin_file(BASE_GIN_FILE, paths)  # MODEL and its defaults, before any file
    files = [base] + [f for f in files if f != base]
  all_files = _with_includes(files, paths)
  check_gin_flags(flag_bindings, all_files, bindings)
  for binding in bindings:
    twice = duplicate_dict_keys(binding.split("=", 1)[-1].strip())
    if twice:
      raise GinConfigError(f"gin binding {binding!r}: key {twice[0]!r} is given twice in a "
                           "dict; gin keeps only the last value, so give each key once")
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
  from ia3_jax.train import partitioning
  partitioning.initialize_distributed(args.coordinator_address, args.num_processes,
                                      args.process_id, cpu_collectives=args.cpu_collectives)


def main(argv: Optional[Sequence[str]] = None, *, action: Optional[str] = None,
         prog: str = "python -m ia3_jax.main") -> int:
  """Parses flags and gin, runs the configured action. Returns the exit status."""
  in_process = argv is not None
  argv, verbose = pop_verbose(sys.argv[1:] if argv is None else argv)
  quiet_runtime(verbose)
  status = report_errors(lambda: run(argv, action=action, prog=prog, verbose=verbose), verbose)
  return status if in_process else runtime.quiet_exit(status, verbose)


def run(argv: Sequence[str], *, action: Optional[str] = None,
        prog: str = "python -m ia3_jax.main", verbose: bool = False,
        help_kind: Optional[str] = None) -> int:
  """`main` without the error reporting: expected failures raise `Ia3JaxError`.

  `help_kind`: the run kind whose gin macros --help lists (default: `action`).
  """
  parser = build_parser(prog, help_kind or action)
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
  files = _ensure_run_file(list(args.gin_file), action)
  if not files:
    parser.error("no --gin_file given (e.g. --gin_file=runs/finetune.gin)")
  if args.host_memory == "reuse":
    log.info(host_memory.reuse_step_buffers())
  _init_processes(args)
  import_tensorflow_quietly(verbose)  # before anything imports it (gin's modules, the data)
  import gin
  from ia3_jax import gin_configurables
  parsed = parse_gin(files, bindings, args.gin_search_paths, gin_flag_bindings)
  if args.print_config:
    print(gin.config_str())
    return 0
  _check_outputs()
  from ia3_jax import tasks
  tasks.register_all()  # the built-in tasks, for names such as rte_fewshot_seed0
  try:
    gin.get_configurable(gin_configurables.run)()
  except (RuntimeError, ValueError) as e:
    if "Required bindings" in str(e) or "gin.REQUIRED" in str(e):
      raise GinConfigError(explain_gin_error(e, parsed, bindings)) from e
    raise
  return 0


if __name__ == "__main__":
  sys.exit(main())
