"""The synthetic demo suite (`ia3_jax.data.synthetic`) as seqio tasks.

    from ia3_jax.tasks import demo
    demo.register()            # the bundled demo vocabulary (ia3_jax/assets/demo/spiece.model)
    demo.register(vocabulary)  # or any seqio.Vocabulary

Names (see `ia3_jax.data` for the naming scheme):

  demo_{family}_train               training families, whole train split
  demo_pretrain_multitask           their mixture (T0-style multitask training)
  demo_{family}_fewshot_seed{S}     held-out families, k few-shot examples per seed
  demo_{family}_eval_{template}, demo_{family}_eval   per template / all templates
  demo_heldout_eval                 every held-out evaluation task

Training families have one split, "train" (evaluated on it too: they only
serve to train the model); held-out families have a "validation" split
(evaluation) and a disjoint "train" pool that few-shot examples are drawn
from. Data is generated when a split is first read, not at registration.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

from ia3_jax.data import synthetic
from ia3_jax.data.sources import Record, Source

TEMPLATE_DIR = os.path.join(os.path.dirname(__file__), "templates")
# The bundled tiny T5's vocabulary (ia3_jax/assets/demo/spiece.model).
VOCAB_PATH = os.path.join(os.path.dirname(os.path.dirname(synthetic.__file__)), "assets", "demo",
                          "spiece.model")
PRETRAIN_MIXTURE = "demo_pretrain_multitask"
HELDOUT_EVAL_MIXTURE = "demo_heldout_eval"
# Stable task ids of the demo datasets (clear of the built-in ids and of 100+ for user data).
TASK_IDS: dict[str, int] = {f"demo_{f}": 200 + i for i, f in enumerate(synthetic.FAMILIES)}

TRAIN_SIZE = 3000        # examples per training family
HELDOUT_EVAL_SIZE = 300  # validation examples per held-out family
HELDOUT_POOL_SIZE = 1000  # few-shot pool per held-out family
NUM_SHOTS = 32
# Sampling rates in the multitask mixture: the word-category families need more steps.
MIXTURE_RATES = {"topic": 2.0, "membership": 2.0}
SEEDS = (0, 1, 2)


class SyntheticSource(Source):
  """The splits of one synthetic family, generated on first use."""

  def __init__(self, family: str, sizes: Mapping[str, int], seed: int = 0):
    self.family = family
    self.name = f"synthetic {family}"
    self.sizes = dict(sizes)
    self.seed = seed
    self._data = None

  @property
  def splits(self):
    return tuple(self.sizes)

  def iterate(self, split):
    self._check_split(split)
    if self._data is None:
      self._data = synthetic.generate_splits(self.family, self.sizes, self.seed)
    for i, fields in enumerate(self._data[split]):
      yield Record(dict(fields), i, f"{self.name}: split {split!r}, example {i}")


def template_path(family: str) -> str:
  return os.path.join(TEMPLATE_DIR, f"{family}.yaml")


def default_vocabulary():
  """The bundled demo SentencePiece vocabulary."""
  from ia3_jax import runtime  # pylint: disable=g-import-not-at-top
  runtime.import_tf()  # quietly, before seqio imports it
  import seqio  # pylint: disable=g-import-not-at-top
  if not os.path.exists(VOCAB_PATH):
    raise FileNotFoundError(f"{VOCAB_PATH}: the demo vocabulary is missing; regenerate it with "
                            "scripts/train_demo_model.py")
  return seqio.SentencePieceVocabulary(VOCAB_PATH)


def specs(*, train_size: int = TRAIN_SIZE, eval_size: int = HELDOUT_EVAL_SIZE,
          pool_size: int = HELDOUT_POOL_SIZE, num_shots: int = NUM_SHOTS,
          seeds: Sequence[int] = SEEDS, families: Sequence[str] | None = None):
  """`ia3_jax.data.DatasetSpec`s of the demo families."""
  from ia3_jax.data import DatasetSpec  # pylint: disable=g-import-not-at-top
  out = []
  for family in families or synthetic.FAMILIES:
    f = synthetic.FAMILIES[family]
    key = f"demo_{family}"
    if f.held_out:
      source = SyntheticSource(family, {"validation": eval_size, "train": pool_size})
      spec = DatasetSpec(key=key, source=source, templates=template_path(family),
                         train_split="train", eval_split="validation", num_shots=num_shots,
                         seeds=tuple(seeds), num_choices=f.num_choices, task_id=TASK_IDS[key])
    else:
      source = SyntheticSource(family, {"train": train_size})
      spec = DatasetSpec(key=key, source=source, templates=template_path(family),
                         train_split="train", eval_split="train", num_shots=None,
                         num_choices=f.num_choices, task_id=TASK_IDS[key])
    out.append(spec)
  return out


def register(vocabulary=None, **kwargs) -> list[str]:
  """Registers the demo tasks and mixtures (replacing earlier ones); returns their names.

  kwargs: see `specs` (sizes, num_shots, seeds, families).
  """
  from ia3_jax import data  # pylint: disable=g-import-not-at-top
  vocabulary = vocabulary or default_vocabulary()
  names, train, heldout_eval = [], [], []
  for spec in specs(**kwargs):
    registered = data.register_dataset(spec, vocabulary)
    names.extend(registered.train + registered.eval + (registered.eval_mixture,))
    if synthetic.FAMILIES[spec.key[len("demo_"):]].held_out:
      heldout_eval.extend(registered.eval)
    else:
      train.extend(registered.train)
  if train:
    rates = [MIXTURE_RATES.get(name[len("demo_"):-len("_train")], 1.0) for name in train]
    names.append(data.add_mixture(PRETRAIN_MIXTURE, train, kind="train", default_split="train",
                                  rates=rates))
  if heldout_eval:
    names.append(data.add_mixture(HELDOUT_EVAL_MIXTURE, heldout_eval, kind="eval",
                                  default_split="validation"))
  return names
