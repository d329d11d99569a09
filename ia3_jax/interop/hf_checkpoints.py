"""Checkpoint I/O: HF T5/T0/mT5 directories <-> T5X param trees, orbax, vocabularies.

HF tensors are read one at a time (safetensors memory-maps; `.bin` files are
opened with `weights_only=True, mmap=True`), converted and placed, so loading
never holds two full copies of the model.
"""

from __future__ import annotations

from ia3_jax.errors import CheckpointError  # re-exported: ia3_jax.errors is its home

import contextlib
import json
import os
import pathlib
from typing import Any, Callable, Iterator, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ia3_jax import files, runtime
from ia3_jax.model.config import T5Config

PathLike = str | os.PathLike
Params = dict[str, Any]

SUPPORTED_MODEL_TYPES = ("t5", "mt5")
_GATED = {"gated-gelu": ("gelu", "linear"), "gated-gelu_new": ("gelu", "linear"),
          "gated-relu": ("relu", "linear"), "gated-silu": ("silu", "linear")}
_SINGLE = {"relu": ("relu",), "gelu": ("gelu_exact",), "gelu_new": ("gelu",), "silu": ("silu",)}




# --------------------------------------------------------------------------- config


def _read_json(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def _scales_decoder_outputs(hf: Mapping[str, Any]) -> bool:
  """T5 1.0 scales the decoder output by d_model^-0.5; T5 1.1 does not.

  transformers 5 writes this as `scale_decoder_outputs`; older files mean it by
  `tie_word_embeddings` (default true).
  """
  if "scale_decoder_outputs" in hf:
    return bool(hf["scale_decoder_outputs"])
  return hf.get("tie_word_embeddings", True) is not False


def config_from_hf(hf: Mapping[str, Any], *, dtype: Any = "float32",
                   source: str = "config.json") -> T5Config:
  """T5Config from an HF `config.json` dict; errors name the field."""
  model_type = hf.get("model_type")
  archs = hf.get("architectures") or []
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise CheckpointError(
        f"{source}: model_type {model_type!r} (architectures {archs}) is not supported; "
        f"ia3-jax loads T5-family encoder-decoders ({', '.join(SUPPORTED_MODEL_TYPES)}).")
  proj = hf.get("feed_forward_proj", "relu")
  acts = _GATED.get(proj) or _SINGLE.get(proj)
  if acts is None:
    raise CheckpointError(f"{source}: feed_forward_proj {proj!r} is not supported.")
  try:
    return T5Config(
        vocab_size=hf["vocab_size"], emb_dim=hf["d_model"], num_heads=hf["num_heads"],
        num_encoder_layers=hf["num_layers"],
        num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        head_dim=hf["d_kv"], mlp_dim=hf["d_ff"], mlp_activations=acts,
        dropout_rate=float(hf.get("dropout_rate", 0.0)),
        logits_via_embedding=_scales_decoder_outputs(hf), dtype=dtype,
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6))
  except KeyError as e:
    raise CheckpointError(f"{source}: missing field {e.args[0]!r}") from e


def config_to_hf(config: T5Config, model_type: str = "t5") -> dict:
  """An HF `config.json` dict describing `config`."""
  acts = tuple(config.mlp_activations)
  proj = next((k for k, v in {**_SINGLE, **_GATED}.items() if v == acts), None)
  if proj is None:
    raise CheckpointError(f"mlp_activations {acts} have no HF feed_forward_proj equivalent")
  return {
      "architectures": ["T5ForConditionalGeneration"], "model_type": model_type,
      "vocab_size": config.vocab_size, "d_model": config.emb_dim, "d_kv": config.head_dim,
      "d_ff": config.mlp_dim, "num_layers": config.num_encoder_layers,
      "num_decoder_layers": config.num_decoder_layers, "num_heads": config.num_heads,
      "relative_attention_num_buckets": config.relative_attention_num_buckets,
      "relative_attention_max_distance": config.relative_attention_max_distance,
      "dropout_rate": config.dropout_rate, "layer_norm_epsilon": config.layer_norm_epsilon,
      "feed_forward_proj": proj, "is_encoder_decoder": True,
      "tie_word_embeddings": config.logits_via_embedding,
      "scale_decoder_outputs": config.logits_via_embedding,
      "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1,
  }


def load_hf_config(path: PathLike, *, dtype: Any = "float32", **fields: Any) -> T5Config:
  """The T5Config of an HF model directory; `fields` set run-time fields (attention_impl, ...)."""
  path = pathlib.Path(path)
  cfg_path = path / "config.json"
  if not path.is_dir():
    raise CheckpointError(f"{path}: not a directory (expected an HF model directory)")
  if not cfg_path.exists():
    raise CheckpointError(f"{path}: no config.json; expected an HF model directory "
                          "(config.json + model.safetensors / pytorch_model.bin)")
  config = config_from_hf(_read_json(cfg_path), dtype=dtype, source=str(cfg_path))
  return config.replace(**fields) if fields else config


# --------------------------------------------------------------------------- names


def hf_name_map(config: T5Config) -> dict[tuple[str, ...], tuple[str, bool]]:
  """T5X param path -> (HF tensor name, whether the HF tensor is transposed)."""
  m: dict[tuple[str, ...], tuple[str, bool]] = {
      ("token_embedder", "embedding"): ("shared.weight", False),
      ("encoder", "relpos_bias", "rel_embedding"):
          ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True),
      ("decoder", "relpos_bias", "rel_embedding"):
          ("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True),
      ("encoder", "encoder_norm", "scale"): ("encoder.final_layer_norm.weight", False),
      ("decoder", "decoder_norm", "scale"): ("decoder.final_layer_norm.weight", False),
  }
  if not config.logits_via_embedding:
    m[("decoder", "logits_dense", "kernel")] = ("lm_head.weight", True)
  acts = config.mlp_activations
  mlp_names = ["wi"] if len(acts) == 1 else [f"wi_{i}" for i in range(len(acts))]

  def attention(prefix, t5x, hf):
    for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o")):
      m[prefix + (t5x, ours, "kernel")] = (f"{hf}.{theirs}.weight", True)

  def mlp(prefix, hf):
    for name in mlp_names + ["wo"]:
      m[prefix + ("mlp", name, "kernel")] = (f"{hf}.DenseReluDense.{name}.weight", True)

  for i in range(config.num_encoder_layers):
    p, h = ("encoder", f"layers_{i}"), f"encoder.block.{i}.layer"
    attention(p, "attention", f"{h}.0.SelfAttention")
    m[p + ("pre_attention_layer_norm", "scale")] = (f"{h}.0.layer_norm.weight", False)
    mlp(p, f"{h}.1")
    m[p + ("pre_mlp_layer_norm", "scale")] = (f"{h}.1.layer_norm.weight", False)
  for i in range(config.num_decoder_layers):
    p, h = ("decoder", f"layers_{i}"), f"decoder.block.{i}.layer"
    attention(p, "self_attention", f"{h}.0.SelfAttention")
    m[p + ("pre_self_attention_layer_norm", "scale")] = (f"{h}.0.layer_norm.weight", False)
    attention(p, "encoder_decoder_attention", f"{h}.1.EncDecAttention")
    m[p + ("pre_cross_attention_layer_norm", "scale")] = (f"{h}.1.layer_norm.weight", False)
    mlp(p, f"{h}.2")
    m[p + ("pre_mlp_layer_norm", "scale")] = (f"{h}.2.layer_norm.weight", False)
  return m


# Copies of `shared.weight` that HF files may carry.
_HF_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


# --------------------------------------------------------------------------- reading


def _weight_files(path: pathlib.Path) -> list[pathlib.Path]:
  for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
    index = path / index_name
    if index.exists():
      weight_map = _read_json(index).get("weight_map")
      if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: no 'weight_map' object")
      files = [path / f for f in dict.fromkeys(weight_map.values())]
      missing = [str(f) for f in files if not f.exists()]
      if missing:
        raise CheckpointError(f"{index}: shard files missing: {', '.join(missing)}")
      return files
  for name in ("model.safetensors", "pytorch_model.bin"):
    if (path / name).exists():
      return [path / name]
  raise CheckpointError(f"{path}: no weights found (model.safetensors, pytorch_model.bin "
                        "or a sharded *.index.json)")


class HostTensor:
  """A checkpoint tensor read on demand, as float32: `t[index]` reads only that block of the
  file, `t.T` is the transposed view (HF [out, in] kernels as T5X's [in, out]), and
  `t.astype(dtype)` / `np.asarray(t)` read the whole tensor a block of the file's leading
  rows at a time into one array of `dtype` (never a float32 copy next to a cast one)."""

  def __init__(self, shape: tuple[int, ...], read: Callable[[tuple[slice, ...]], np.ndarray],
               *, transposed: bool = False, block_elements: int = 1 << 20):
    self.shape, self._read, self._transposed = tuple(shape), read, transposed
    self.block_elements = block_elements
    self.dtype = np.dtype(np.float32)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def T(self) -> "HostTensor":  # noqa: N802 (numpy's name)
    return HostTensor(self.shape[::-1], self._read, transposed=not self._transposed,
                      block_elements=self.block_elements)

  def __getitem__(self, index: Any) -> np.ndarray:
    index = index if isinstance(index, tuple) else (index,)
    if Ellipsis in index:
      at = index.index(Ellipsis)
      index = index[:at] + (slice(None),) * (self.ndim - len(index) + 1) + index[at + 1:]
    index = index + (slice(None),) * (self.ndim - len(index))
    if not all(isinstance(i, slice) for i in index):
      raise TypeError(f"HostTensor: only slices index a checkpoint tensor, got {index!r}")
    index = tuple(slice(*i.indices(n)) for i, n in zip(index, self.shape))  # clipped
    block = self._read(index[::-1] if self._transposed else index)
    return np.asarray(block.T if self._transposed else block, np.float32)

  def astype(self, dtype: Any, copy: bool = True) -> np.ndarray:
    del copy  # always a new array: the tensor lives in the file
    out = np.empty(self.shape, dtype)
    if self.ndim == 0:
      out[()] = self._read(())
      return out
    axis = self.ndim - 1 if self._transposed else 0  # the file's leading axis: contiguous reads
    rows = max(1, self.block_elements * self.shape[axis] // max(1, int(np.prod(self.shape))))
    for i in range(0, self.shape[axis], rows):
      at = (slice(None),) * axis + (slice(i, i + rows),)
      out[at] = self[at]
    return out

  def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
    return self.astype(dtype or np.float32)


@contextlib.contextmanager
def _safetensors_file(file: pathlib.Path) -> Iterator[Any]:
  """`safe_open(file)`, its errors (truncated, not safetensors, unreadable) as one line
  naming the file."""
  from safetensors import SafetensorError, safe_open  # bfloat16: NumPy knows it once JAX is imported
  try:
    with safe_open(str(file), framework="numpy") as f:
      yield f
  except (SafetensorError, OSError) as e:
    detail = getattr(e, "strerror", None) or str(e)
    raise CheckpointError(f"{file}: not a readable safetensors file ({detail}); is it "
                          "truncated or another format? Copy or download it again") from None


def iter_safetensors(file: pathlib.Path) -> Iterator[tuple[str, HostTensor]]:
  """(name, HostTensor) for every tensor of a safetensors file, read block by block: the file
  is opened per block, so its pages are mapped only while a block is read."""

  def reader(name: str) -> Callable[[tuple[slice, ...]], np.ndarray]:
    def read(index: tuple[slice, ...]) -> np.ndarray:
      with _safetensors_file(file) as f:
        return f.get_slice(name)[index]
    return read
  with _safetensors_file(file) as f:
    shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
  for name, shape in shapes.items():
    yield name, HostTensor(shape, reader(name))


def _torch_load(file: pathlib.Path) -> Any:
  """A pickled state dict with `weights_only=True`: memory-mapped, or read whole for the
  pre-zip format (`_use_new_zipfile_serialization=False`), which cannot be mapped."""
  import pickle
  import torch
  refused = (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError,
             EOFError)
  try:
    return torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
  except refused as mapped:
    try:
      return torch.load(str(file), map_location="cpu", weights_only=True)
    except refused as e:
      raise CheckpointError(
          f"{file}: refused to unpickle: not a plain state dict of tensors (loaded with "
          f"weights_only=True for safety; {type(e).__name__}: {str(e).splitlines()[0]})"
          ) from mapped


def iter_torch_bin(file: pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
  try:
    import torch
  except ImportError as e:
    raise CheckpointError(f"{file}: reading .bin checkpoints needs PyTorch "
                          "(pip install torch), or convert the model to safetensors") from e
  state = _torch_load(file)
  if not isinstance(state, dict):
    raise CheckpointError(f"{file}: expected a state dict of tensors, got {type(state).__name__}")
  for name in list(state):
    tensor = state.pop(name)
    if not isinstance(tensor, torch.Tensor):
      raise CheckpointError(f"{file}: entry {name!r} is {type(tensor).__name__}, not a tensor")
    if tensor.dtype == torch.bfloat16:
      import ml_dtypes
      yield name, tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
      yield name, tensor.numpy()


def iter_hf_tensors(path: PathLike) -> Iterator[tuple[str, np.ndarray | HostTensor]]:
  """Yields (name, tensor) for every tensor of an HF directory, one at a time (safetensors:
  a `HostTensor`, read when used; `.bin`: an array mapped from the file)."""
  for file in _weight_files(pathlib.Path(path)):
    reader = iter_safetensors if file.suffix == ".safetensors" else iter_torch_bin
    yield from reader(file)


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def load_hf_checkpoint(path: PathLike, *, dtype: Any = jnp.float32,
                       activation_dtype: Any = "float32",
                       convert: Optional[Callable[[str, np.ndarray], Any]] = None
                       ) -> tuple[T5Config, Params]:
  """Reads an HF T5/T0/mT5 directory into (config, params in the T5X tree).

  Tensors are read one at a time. Each comes back as a host NumPy array cast
  to `dtype`, or as `convert(path, tensor)` gives it, where `tensor` is float32 and
  array-like in the T5X layout (a `HostTensor` for safetensors files: `.shape`, slicing,
  `.astype`, read from the file block by block; e.g. `FrozenStorage.store` casts or
  quantises it as it is read, so no float32 copy of the whole model, nor of one large
  tensor, ever exists); place them on devices (e.g. with `partitioning`) afterwards.
  """
  if convert is None:  # a C-ordered host copy in `dtype` (the one copy of the tensor)
    convert = lambda _, value: _host_copy(value, dtype)  # noqa: E731
  path = pathlib.Path(path)
  config = load_hf_config(path, dtype=activation_dtype)
  by_hf = {hf: (ours, transposed) for ours, (hf, transposed) in hf_name_map(config).items()}
  expected = expected_shapes(config)
  params: dict = {}
  seen: set[str] = set()
  alias: Optional[np.ndarray] = None
  tied_head: Optional[np.ndarray] = None
  lm_head_expected = "lm_head.weight" in by_hf
  shared: Optional[np.ndarray] = None  # float32, for an lm_head tied to it (one tensor)
  unexpected = []
  for name, array in iter_hf_tensors(path):
    if name in _HF_ALIASES:
      alias = array if alias is None else alias
      continue
    if name == "lm_head.weight" and not lm_head_expected:
      tied_head = array  # T5 1.0 files may repeat the embedding here; checked below
      continue
    if name not in by_hf:
      unexpected.append(name)
      continue
    ours, transposed = by_hf[name]
    value = _float32(array.T if transposed else array)  # a view or a HostTensor: no copy
    want = expected[ours]
    if value.shape != want:
      raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(array.shape)}; "
                            f"expected {want[::-1] if transposed else want} for {'/'.join(ours)}")
    if name == "shared.weight" and lm_head_expected and "lm_head.weight" not in seen:
      shared = value  # until lm_head.weight arrives (or does not: tied, see below)
    if name == "lm_head.weight":
      shared = None
    _set(params, ours, convert("/".join(ours), value))
    del value, array  # one tensor at a time
    seen.add(name)
  if unexpected:
    raise CheckpointError(f"{path}: unexpected tensors (not part of a T5 model): "
                          f"{', '.join(sorted(unexpected)[:10])}")
  if "shared.weight" not in seen and alias is not None:  # embeddings stored only per stack
    shared = _float32(alias)
    _set(params, ("token_embedder", "embedding"), convert("token_embedder/embedding", shared))
    seen.add("shared.weight")
  if tied_head is not None and not np.array_equal(
      np.asarray(convert("token_embedder/embedding", np.asarray(tied_head, np.float32))),
      np.asarray(params.get("token_embedder", {}).get("embedding"))):
    raise CheckpointError(
        f"{path}: has a separate lm_head.weight but its config scales decoder outputs "
        "(T5 1.0 style, tied embeddings); ia3-jax cannot represent that combination.")
  if lm_head_expected and "lm_head.weight" not in seen and "shared.weight" in seen:
    # transformers 5 ties lm_head to the embedding and saves only the latter.
    _set(params, ("decoder", "logits_dense", "kernel"),
         convert("decoder/logits_dense/kernel", shared.T))
    seen.add("lm_head.weight")
  missing = sorted(set(by_hf) - seen)
  if missing:
    raise CheckpointError(f"{path}: missing tensors: {', '.join(missing[:10])}"
                          + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""))
  return config, params


def _float32(tensor: np.ndarray | HostTensor) -> np.ndarray | HostTensor:
  """`tensor` as float32 without reading it: a HostTensor as is, an array as a float32 view
  (a copy only for another dtype)."""
  return tensor if isinstance(tensor, HostTensor) else np.asarray(tensor, np.float32)


def _host_copy(tensor: np.ndarray | HostTensor, dtype: Any) -> np.ndarray:
  """A C-ordered host array of `tensor` in `dtype` (its one copy)."""
  if isinstance(tensor, HostTensor):
    return tensor.astype(dtype)
  return np.array(tensor, dtype=dtype, order="C")


def expected_shapes(config: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Param path -> shape of `config`'s network, either family, from `jax.eval_shape`."""
  from ia3_jax.model import families
  family = families.of(config)
  abstract = flax.linen.unbox(family.abstract_params(family.build(config)))
  flat = flax.traverse_util.flatten_dict(abstract)
  return {k: tuple(v.shape) for k, v in flat.items()}


def check_params_match(params: Params, config: Any, *, source: str = "params") -> None:
  """Raises naming the first param whose name or shape differs from `config`'s tree (either
  model family)."""
  expected = expected_shapes(config)
  flat = flax.traverse_util.flatten_dict(flax.linen.unbox(params))
  for key in sorted(set(expected) | set(flat)):
    name = "/".join(key)
    if key not in flat:
      raise CheckpointError(f"{source}: missing param {name} (shape {expected[key]})")
    if key not in expected:
      raise CheckpointError(f"{source}: param {name} is not part of this model")
    if tuple(flat[key].shape) != expected[key]:
      raise CheckpointError(f"{source}: param {name} has shape {tuple(flat[key].shape)}, "
                            f"model expects {expected[key]}")


# --------------------------------------------------------------------------- writing


def export_hf_checkpoint(params: Params, config: T5Config, path: PathLike, *,
                         model_type: str = "t5", max_shard_bytes: int = 4 << 30) -> pathlib.Path:
  """Writes params as an HF directory that `T5ForConditionalGeneration.from_pretrained` loads.

  Tensors are float32 safetensors, sharded (with an index) above `max_shard_bytes`.
  """
  check_params_match(params, config)
  return write_hf_directory(params, hf_name_map(config), path, config_to_hf(config, model_type),
                            max_shard_bytes=max_shard_bytes)


def write_hf_directory(params: Params, names: Mapping[tuple[str, ...], tuple[str, bool]],
                       path: PathLike, hf_config: Mapping[str, Any], *,
                       max_shard_bytes: int = 4 << 30) -> pathlib.Path:
  """Writes `params` as an HF model directory: `names` maps each param path to its HF tensor
  name and whether it is stored transposed; float32 safetensors, sharded (with an index) above
  `max_shard_bytes`; `hf_config` becomes config.json. Shared by both model families."""
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  flat = flax.traverse_util.flatten_dict(flax.linen.unbox(params))
  shards: list[list[tuple[str, ...]]] = [[]]
  size = 0
  for key in names:
    nbytes = int(np.prod(flat[key].shape)) * 4
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(key)
    size += nbytes
  weight_map = {}
  for i, keys in enumerate(shards):
    fname = ("model.safetensors" if len(shards) == 1
             else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
    tensors = {}
    for key in keys:
      hf, transposed = names[key]
      value = np.asarray(jax.device_get(flat[key]), np.float32)
      tensors[hf] = np.ascontiguousarray(value.T if transposed else value)
      weight_map[hf] = fname
    files.write_safetensors(path / fname, tensors, {"format": "pt"})
  if len(shards) > 1:
    total = sum(int(np.prod(flat[k].shape)) * 4 for k in names)
    files.write_json(path / "model.safetensors.index.json",
                     {"metadata": {"total_size": total}, "weight_map": weight_map})
  files.write_json(path / "config.json", dict(hf_config))
  return path


# --------------------------------------------------------------------------- orbax


def save_params(path: PathLike, params: Params) -> pathlib.Path:
  """Saves a param tree with orbax (atomic: written to a temp dir, then renamed)."""
  import orbax.checkpoint as ocp
  path = pathlib.Path(path).absolute()
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, flax.linen.unbox(params))
    ckptr.wait_until_finished()
  return path


def restore_params(path: PathLike, target: Optional[Params] = None) -> Params:
  """Restores a param tree saved by `save_params` (shapes/shardings from `target` if given)."""
  import orbax.checkpoint as ocp
  path = pathlib.Path(path).absolute()
  if not path.exists():
    raise CheckpointError(f"{path}: no such checkpoint")
  with ocp.StandardCheckpointer() as ckptr:
    if target is None:
      return ckptr.restore(path)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return ckptr.restore(path, abstract)


# --------------------------------------------------------------------------- vocabulary

_SPM_NAMES = ("spiece.model", "sentencepiece.model", "tokenizer.model")


def load_vocabulary(path: PathLike, extra_ids: Optional[int] = None):
  """The model's SentencePiece vocabulary as a `seqio.SentencePieceVocabulary`.

  `path` is an HF directory or a `.model` file. `extra_ids` (T5's sentinel
  tokens) defaults to the directory's `tokenizer_config.json` value, else 0.
  """
  runtime.import_tf()  # quietly, before seqio imports it
  import seqio
  path = pathlib.Path(path)
  model_file = path
  if path.is_dir():
    found = [path / n for n in _SPM_NAMES if (path / n).exists()]
    if not found:
      raise CheckpointError(f"{path}: no SentencePiece model ({', '.join(_SPM_NAMES)}); "
                            "ia3-jax tokenizes with the model's SentencePiece vocabulary")
    model_file = found[0]
    tok_cfg = path / "tokenizer_config.json"
    if extra_ids is None and tok_cfg.exists():
      extra_ids = int(_read_json(tok_cfg).get("extra_ids", 0))
  elif not path.exists():
    raise CheckpointError(f"{path}: no such SentencePiece model file")
  return seqio.SentencePieceVocabulary(str(model_file), extra_ids=extra_ids or 0)


def load_initial_params(path: Optional[str | os.PathLike],
                        convert: Optional[Callable[[str, np.ndarray], Any]] = None
                        ) -> tuple[Optional[dict[str, Any]], Optional[T5Config]]:
  """A run's initial params: an HF directory (config.json; with its config) or orbax params.

  `convert(path, float32 tensor)`: each tensor's stored form (see `load_hf_checkpoint`).
  """
  if not path:
    return None, None
  p = pathlib.Path(path)
  if (p / "config.json").exists():
    config, params = load_hf_checkpoint(p, convert=convert)
    return params, config
  params = restore_params(p)
  if convert is not None:
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    params = flax.traverse_util.unflatten_dict(
        {k: convert(k, np.asarray(v, np.float32)) for k, v in flat.items()}, sep="/")
  return params, None
