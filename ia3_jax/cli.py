"""The `ia3-jax` console script.

  ia3-jax demo   [--gin.KEY=VALUE ...]                 zero-shot vs T-Few on the bundled model (demo.gin)
  ia3-jax train  --gin_file=... [--gin.KEY=VALUE ...]   fine-tune (runs/finetune.gin)
  ia3-jax eval   --gin_file=... [--gin.KEY=VALUE ...]   accuracy of a checkpoint (runs/eval.gin)
  ia3-jax score  --gin_file=... [--gin.KEY=VALUE ...]   per-choice scores (runs/score.gin)
  ia3-jax infer  --gin_file=... [--gin.KEY=VALUE ...]   predictions (runs/infer.gin)
  ia3-jax convert SRC DST                               HF directory <-> orbax params (both families)
  ia3-jax merge --base HF_DIR --ia3 CKPT --out DIR      fold (IA)^3 vectors into the kernels
  ia3-jax export-peft --checkpoint CKPT --out DIR       (IA)^3 vectors as an HF peft adapter
  ia3-jax combine --method M --adapters A B .. --out DIR  several (IA)^3 adapters -> one peft adapter
  ia3-jax costs [...]                                   the paper's FLOPs / storage table
  ia3-jax peft-counts [--model PRESET] [--methods M,..]  trainable params per PEFT method
  ia3-jax raft-submission --predictions F --out DIR     RAFT leaderboard files (ID,Label CSVs)

train/eval/score/infer take the flags of `python -m ia3_jax.main` and add
their run file when none is given; `ia3-jax COMMAND --help` lists a command's
flags (and the gin macros of a run). An expected failure prints one line
("error: ..." naming the file, flag or field) and exits 1 (gin configuration
errors: 2; Ctrl-C: 130); --verbose or IA3_JAX_VERBOSE=1 adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
from typing import Optional, Sequence

import numpy as np

from ia3_jax import files, runtime
from ia3_jax import main as main_lib
from ia3_jax.errors import ConfigError

COMMANDS = ("demo", "train", "eval", "score", "infer", "convert", "merge", "export-peft", "combine",
            "costs", "peft-counts", "raft-submission")


def _usage() -> str:
  return __doc__.split("\n\n")[1] if __doc__ else ""


# --------------------------------------------------------------------------- helpers


def _config_for(model: Optional[str], base: Optional[str], checkpoint_meta: Optional[dict]):
  """Model config (T5 or decoder-only) from a preset name, an HF directory's config.json, or a
  checkpoint's meta."""
  from ia3_jax.interop import hf_families
  from ia3_jax.model import families
  if model:
    try:
      return families.preset(model)
    except KeyError as e:
      raise ConfigError(f"--model: {e.args[0]}") from e
  if base:
    return hf_families.of_dir(base).load_config(base)
  if checkpoint_meta and "model_config" in checkpoint_meta:
    return families.config_from_dict(checkpoint_meta["model_config"])
  raise ConfigError("give --model PRESET or --base HF_DIR to know the model shape")


# --------------------------------------------------------------------------- commands


def convert(argv: Sequence[str]) -> int:
  p = argparse.ArgumentParser(prog="ia3-jax convert", description=(
      "HF directory (T5/T0/mT5, Llama/Mistral/Qwen2) -> orbax param checkpoint (fast, sharded "
      "loading as INITIAL_CHECKPOINT_PATH), or orbax params -> HF directory (--to hf)."))
  p.add_argument("src", help="HF model directory (with config.json) or orbax param checkpoint")
  p.add_argument("dst", help="output directory")
  p.add_argument("--to", choices=("orbax", "hf"), default=None,
                 help="output format (default: the other one)")
  p.add_argument("--model", default=None, help="preset of an orbax source without "
                 "model_config.json (for --to hf)")
  p.add_argument("--model_type", default=None, choices=("t5", "mt5", "llama", "mistral", "qwen2"),
                 help="HF model class written with --to hf (default: t5 for T5 models, the "
                 "decoder-only config's own)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
  _add_verbose_flag(p)
  args = p.parse_args(argv)
  from ia3_jax.interop import hf_checkpoints, hf_families
  src = pathlib.Path(args.src)
  _check_not_inside("DST", args.dst, [("SRC", args.src)])
  src_is_hf = (src / "config.json").exists()
  to = args.to or ("orbax" if src_is_hf else "hf")
  if src.is_dir() and not src_is_hf and not (src / "_METADATA").exists():
    raise hf_checkpoints.CheckpointError(
        f"{src}: no config.json (not an HF model directory) and no _METADATA (not an orbax "
        "param checkpoint)")
  files.check_output_dir(args.dst, overwrite=args.overwrite, flag="DST")
  if src_is_hf:
    config, params = hf_families.of_dir(src).load(args.src)
  else:
    params = hf_checkpoints.restore_params(args.src)
    meta_file = pathlib.Path(args.src) / "model_config.json"
    meta = {"model_config": json.loads(meta_file.read_text())} if meta_file.exists() else None
    config = _config_for(args.model, None, meta)
    hf_checkpoints.check_params_match(params, config, source=args.src)
  files.check_free_space(args.dst, _float32_bytes(config), f"the {to} checkpoint")
  with files.output_dir(args.dst, overwrite=args.overwrite, flag="DST") as tmp:
    if to == "orbax":
      hf_checkpoints.save_params(tmp, params)
      files.write_json(tmp / "model_config.json", config.to_dict())
    else:
      model_type = hf_families.model_type_for(config, args.model_type)
      hf_families.of(config).export(params, config, tmp, model_type=model_type)
  print(f"wrote {to} checkpoint {pathlib.Path(args.dst).absolute()}")
  return 0


def _float32_bytes(config) -> int:
  """Bytes of `config`'s params as float32 (what convert and merge write), plus 1% and 1 MB
  for headers and metadata."""
  from ia3_jax.interop import hf_checkpoints
  n = sum(int(np.prod(s)) for s in hf_checkpoints.expected_shapes(config).values())
  return int(n * 4 * 1.01) + (1 << 20)


def _check_not_inside(flag: str, out: str, inputs: Sequence[tuple[str, Optional[str]]]) -> None:
  """Refuses an output directory that is, or holds, one of the inputs: writing it (it is
  replaced whole) would destroy what is being read, e.g. `merge --out` onto its own `--base`."""
  for name, source in inputs:
    if source and os.path.exists(source) and files.is_inside(source, out):
      raise ConfigError(f"{flag} {out}: is or holds {name} {source}; write the output "
                        "to another directory (the input is left as it is)")


def merge(argv: Sequence[str]) -> int:
  p = argparse.ArgumentParser(prog="ia3-jax merge", description=(
      "Fold one task's (IA)^3 vectors into the base kernels and write the merged model."))
  p.add_argument("--base", required=True, help="HF model directory (T5, Llama, Mistral, Qwen2)")
  p.add_argument("--ia3", required=True, help="training checkpoint (MODEL_DIR, checkpoints/ "
                 "or a step), peft IA3 adapter directory, T-Few state dict, or orbax params")
  p.add_argument("--out", required=True, help="output directory of the merged model")
  p.add_argument("--task", type=int, default=0, help="row of a task bank (NUM_TASKS > 1)")
  p.add_argument("--format", choices=("hf", "orbax"), default="hf",
                 help="HF directory (safetensors) or orbax params")
  p.add_argument("--model_type", choices=("t5", "mt5", "llama", "mistral", "qwen2"),
                 default=None, help="HF model class of an hf output (default: t5, or the "
                 "decoder-only base's own)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out model")
  _add_verbose_flag(p)
  args = p.parse_args(argv)
  from ia3_jax.interop import hf_families, ia3_adapters
  _check_not_inside("--out", args.out, [("--base", args.base), ("--ia3", args.ia3)])
  files.check_output_dir(args.out, overwrite=args.overwrite)
  files.check_free_space(args.out, _float32_bytes(hf_families.of_dir(args.base).load_config(
      args.base)), "the merged model")
  from ia3_jax.train import checkpointer
  source = args.ia3
  if checkpointer.is_training_checkpoint(source):
    source = str(checkpointer.trainable_dir(source))
  with files.output_dir(args.out, overwrite=args.overwrite) as tmp:
    ia3_adapters.merge_checkpoint(args.base, source, tmp, task=args.task,
                                  output_format=args.format, model_type=args.model_type)
    # The vocabulary (and HF tokenizer files) of the base, so the merged model is usable alone.
    copied = [name for name in ("spiece.model", "tokenizer_config.json", "tokenizer.model",
                                "special_tokens_map.json", "tokenizer.json")
              if (pathlib.Path(args.base) / name).is_file()]
    for name in copied:
      shutil.copyfile(pathlib.Path(args.base) / name, tmp / name)
  out = pathlib.Path(args.out).absolute()
  if not {"spiece.model", "tokenizer.model", "tokenizer.json"} & set(copied):
    print(f"warning: {args.base} has no spiece.model (nor tokenizer.model / tokenizer.json); "
          f"{out} has no vocabulary", file=sys.stderr)
  print(f"wrote merged model {out}")
  return 0


def export_peft(argv: Sequence[str]) -> int:
  p = argparse.ArgumentParser(prog="ia3-jax export-peft", description=(
      "Write the (IA)^3 vectors of a training checkpoint as an HF peft IA3 adapter."))
  p.add_argument("--checkpoint", required=True, help="MODEL_DIR, checkpoints/ or a step")
  p.add_argument("--out", required=True, help="output directory of the adapter")
  p.add_argument("--base", default=None, help="HF model directory (for the model shape; "
                 "default: the checkpoint's own model config)")
  p.add_argument("--model", default=None, help="model preset (for the model shape)")
  p.add_argument("--task", type=int, default=0,
                 help="row of a task bank to export (NUM_TASKS > 1)")
  p.add_argument("--convention", choices=("t5", "mt5", "tfew"), default="t5",
                 help="where the MLP vector goes: t5 scales the input of wo (peft's T5 "
                      "default); mt5 = tfew scales the output of the linear wi_1 branch "
                      "(peft's mT5 default, T-Few; needs a gated MLP)")
  p.add_argument("--base_model_name_or_path", default=None,
                 help="written to adapter_config.json (default: --base)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out adapter")
  _add_verbose_flag(p)
  args = p.parse_args(argv)
  from ia3_jax.interop import ia3_adapters
  from ia3_jax.train import checkpointer
  _check_not_inside("--out", args.out, [("--checkpoint", args.checkpoint),
                                       ("--base", args.base)])
  files.check_output_dir(args.out, overwrite=args.overwrite)
  trainable, meta = checkpointer.restore_trainable(args.checkpoint)
  config = _config_for(args.model, args.base, meta)
  with files.output_dir(args.out, overwrite=args.overwrite) as tmp:
    ia3_adapters.export_peft_adapter(trainable, config, tmp, task=args.task,
                                     convention=args.convention,
                                     base_model_name_or_path=(args.base_model_name_or_path
                                                              or args.base))
  print(f"wrote peft adapter {pathlib.Path(args.out).absolute()}")
  return 0


# The optional flags of `combine` that each --method reads.
COMBINE_FLAGS = {"linear": ("weights",), "multiplicative": (),
                 "task_arithmetic": ("weights", "lambda_"), "ties": ("k", "lambda_")}


def combine(argv: Sequence[str]) -> int:
  p = argparse.ArgumentParser(prog="ia3-jax combine", description=(
      "Combine one-task (IA)^3 adapters (peft IA3 directories, T-Few state dicts) into one "
      "peft IA3 adapter (ia3_jax.peft.combine): linear sum_i w_i l_i (peft's "
      "add_weighted_adapter), multiplicative prod_i l_i, task_arithmetic "
      "1 + lambda sum_i w_i (l_i - 1), ties 1 + lambda TIES-merge of the l_i - 1."))
  p.add_argument("--method", required=True, choices=tuple(COMBINE_FLAGS),
                 help="how to combine (formulas above)")
  p.add_argument("--adapters", required=True, nargs="+", metavar="ADAPTER",
                 help="peft IA3 adapter directories and/or T-Few state dict files")
  p.add_argument("--weights", type=float, nargs="+", default=None,
                 help="one weight per adapter (linear: required; task_arithmetic: default 1)")
  p.add_argument("--lambda", dest="lambda_", metavar="LAMBDA", type=float, default=None,
                 help="scale of the merged task vector (task_arithmetic, ties; default 1)")
  p.add_argument("--k", type=float, default=None,
                 help="ties: percentage of each adapter's entries kept, in (0, 100] (default 20)")
  p.add_argument("--base", default=None, help="HF model directory (for the model shape)")
  p.add_argument("--model", default=None, help="model preset (for the model shape)")
  p.add_argument("--out", required=True, help="output directory of the peft adapter")
  p.add_argument("--convention", choices=("t5", "mt5", "tfew"), default="t5",
                 help="where the MLP vector goes in the written adapter (as export-peft)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out adapter")
  _add_verbose_flag(p)
  args = p.parse_args(argv)
  from ia3_jax.interop import ia3_adapters
  from ia3_jax.peft import combine as combine_lib
  unused = [f for f in ("weights", "lambda_", "k") if getattr(args, f) is not None
            and f not in COMBINE_FLAGS[args.method]]
  if unused:
    flag = "--" + unused[0].rstrip("_")
    raise ConfigError(f"{flag}: not used by --method {args.method}")
  if args.method == "linear" and args.weights is None:
    raise ConfigError("--weights: --method linear needs one weight per adapter")
  twice = sorted({a for a in args.adapters if args.adapters.count(a) > 1})
  if twice:
    raise ConfigError(f"--adapters: {twice[0]} given twice (give it once, with the summed weight)")
  _check_not_inside("--out", args.out,
                    [("--adapters", a) for a in args.adapters] + [("--base", args.base)])
  files.check_output_dir(args.out, overwrite=args.overwrite)
  config = _config_for(args.model, args.base, None)
  adapters = {a: ia3_adapters.import_adapter(a, config) for a in args.adapters}
  lam = 1.0 if args.lambda_ is None else args.lambda_
  if args.method == "linear":
    combined = combine_lib.linear(adapters, args.weights)
  elif args.method == "multiplicative":
    combined = combine_lib.multiplicative(adapters)
  elif args.method == "task_arithmetic":
    combined = combine_lib.task_arithmetic(adapters, lam, args.weights)
  else:
    combined = combine_lib.ties(adapters, 20.0 if args.k is None else args.k, lam)
  with files.output_dir(args.out, overwrite=args.overwrite) as tmp:
    ia3_adapters.export_peft_adapter(combined, config, tmp, convention=args.convention,
                                     base_model_name_or_path=args.base)
  print(f"wrote peft adapter {pathlib.Path(args.out).absolute()} ({args.method} of "
        f"{len(adapters)} adapters)")
  return 0


def _add_verbose_flag(p: argparse.ArgumentParser) -> None:
  p.add_argument("--verbose", action="store_true",
                 help=f"print the traceback of an error (also {main_lib.VERBOSE_ENV}=1)")


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`ia3-jax ...` (argv None: this process's arguments, and the process ends after it)."""
  in_process = argv is not None
  argv, verbose = main_lib.pop_verbose(sys.argv[1:] if argv is None else argv)
  main_lib.quiet_runtime(verbose)
  status = main_lib.report_errors(lambda: _dispatch(argv, verbose), verbose)
  return status if in_process else runtime.quiet_exit(status, verbose)


def _dispatch(argv: Sequence[str], verbose: bool) -> int:
  if not argv or argv[0] in ("-h", "--help"):
    print(f"usage: ia3-jax {{{','.join(COMMANDS)}}} ...\n\n{_usage()}")
    return 0 if argv else 2
  cmd, rest = argv[0], list(argv[1:])
  if cmd in ("train", "eval", "score", "infer"):
    return main_lib.run(rest, action=cmd, prog=f"ia3-jax {cmd}", verbose=verbose)
  if cmd == "demo":
    return main_lib.run(["--gin_file=demo.gin", *rest], prog="ia3-jax demo", verbose=verbose,
                        help_kind="demo")
  if cmd == "convert":
    return convert(rest)
  if cmd == "merge":
    return merge(rest)
  if cmd == "export-peft":
    return export_peft(rest)
  if cmd == "combine":
    return combine(rest)
  if cmd == "costs":
    from ia3_jax import costs
    return costs.main(rest)
  if cmd == "peft-counts":
    from ia3_jax.peft import counts
    return counts.main(rest)
  if cmd == "raft-submission":
    from ia3_jax.tasks import raft_submission
    return raft_submission.main(rest)
  print(f"ia3-jax: unknown command {cmd!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main())
