"""Generic trainable-param utilities: masks, partition/combine, counts, gradients."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ia3_jax.model import network
from ia3_jax.model import params as params_lib
from ia3_jax.model.config import get_config


def _tree():
  return {"encoder": {"layers_0": {"attention": {"key": {"kernel": np.ones((4, 3))},
                                                "ia3_key": np.full((1, 3), 2.0)},
                                  "mlp": {"wo": {"kernel": np.ones((5, 4))}}}},
          "decoder": {"decoder_norm": {"scale": np.ones(4)}}}


def test_flatten_paths_and_round_trip():
  tree = _tree()
  assert params_lib.paths(tree) == ["decoder/decoder_norm/scale", "encoder/layers_0/attention/ia3_key",
                           "encoder/layers_0/attention/key/kernel",
                           "encoder/layers_0/mlp/wo/kernel"]
  assert jax.tree.structure(params_lib.unflatten(params_lib.flatten(tree))) == jax.tree.structure(tree)


@pytest.mark.parametrize("patterns,expected", [
    (r".*/ia3_[a-z_]+", ["encoder/layers_0/attention/ia3_key"]),
    ([r".*norm.*", r".*/wo/.*"], ["decoder/decoder_norm/scale", "encoder/layers_0/mlp/wo/kernel"]),
    (lambda path: path.endswith("kernel"), ["encoder/layers_0/attention/key/kernel",
                                           "encoder/layers_0/mlp/wo/kernel"]),
])
def test_trainable_mask_fullmatch(patterns, expected):
  mask = params_lib.flatten(params_lib.trainable_mask(_tree(), patterns))
  assert sorted(p for p, m in mask.items() if m) == expected


def test_fullmatch_not_search():
  # "ia3" alone matches nothing under fullmatch: reported, not silently empty.
  with pytest.raises(ValueError, match="'ia3' matches no param"):
    params_lib.trainable_mask(_tree(), "ia3")
  mask = params_lib.trainable_mask(_tree(), "ia3", allow_unmatched=True)
  assert not any(jax.tree.leaves(mask))


def test_invalid_regex_is_named():
  with pytest.raises(ValueError, match=r"'\(unclosed' is not a valid regular expression"):
    params_lib.trainable_mask(_tree(), "(unclosed")


def test_partition_combine_round_trip():
  tree = _tree()
  trainable, frozen = params_lib.select(tree, [r".*ia3_.*", r".*norm.*"])
  assert params_lib.paths(trainable) == ["decoder/decoder_norm/scale", "encoder/layers_0/attention/ia3_key"]
  assert params_lib.paths(frozen) == ["encoder/layers_0/attention/key/kernel",
                            "encoder/layers_0/mlp/wo/kernel"]
  back = params_lib.combine(trainable, frozen)
  assert params_lib.paths(back) == params_lib.paths(tree)
  for path, value in params_lib.flatten(tree).items():
    assert params_lib.flatten(back)[path] is value  # same objects, nothing copied


def test_combine_overlap_and_mask_mismatch_raise():
  tree = _tree()
  trainable, _ = params_lib.select(tree, r".*ia3_.*")
  with pytest.raises(ValueError, match="ia3_key is present in more than one tree"):
    params_lib.combine(trainable, tree)
  with pytest.raises(ValueError, match="mask does not match"):
    params_lib.partition(tree, {"encoder": {}})


def test_frozendict_input():
  trainable, frozen = params_lib.select(flax.core.freeze(_tree()), r".*ia3_.*")
  assert params_lib.count(trainable) == 3 and params_lib.count(frozen) == 12 + 20 + 4


def test_count_and_nbytes_on_abstract_boxed_tree():
  model = network.Transformer(get_config("tiny"))
  abstract = network.abstract_params(model)  # boxed ShapeDtypeStructs
  assert params_lib.count(abstract) == network.param_count(abstract)
  assert params_lib.nbytes(abstract) == 4 * network.param_count(abstract)
  mask = params_lib.trainable_mask(abstract, r".*layer_norm/scale")
  n_norms = 2 * 2 + 3 * 2  # encoder: 2 per layer; decoder: 3 per layer; 2 layers each
  assert params_lib.count(abstract, mask) == n_norms * 32
  # boxes survive partitioning (sharding specs can be read from either part)
  trainable, _ = params_lib.partition(abstract, mask)
  assert all(isinstance(x, flax.linen.LogicallyPartitioned)
             for x in jax.tree.leaves(trainable, is_leaf=lambda x: isinstance(
                 x, flax.linen.LogicallyPartitioned)))


def test_grad_only_wrt_trainable():
  tree = jax.tree.map(jnp.asarray, _tree())
  trainable, frozen = params_lib.select(tree, r".*ia3_.*")

  def loss(tr, fr):
    p = params_lib.combine(tr, fr)
    att = p["encoder"]["layers_0"]["attention"]
    y = jnp.ones((2, 4)) @ att["key"]["kernel"] * att["ia3_key"][0]
    return jnp.sum(y ** 2)

  grads = jax.grad(loss)(trainable, frozen)
  assert params_lib.paths(grads) == ["encoder/layers_0/attention/ia3_key"]
  # d/dl sum((4 * l)^2) = 32 l = 64 at l = 2, two rows
  np.testing.assert_allclose(grads["encoder"]["layers_0"]["attention"]["ia3_key"],
                             np.full((1, 3), 2 * 32 * 2.0))
