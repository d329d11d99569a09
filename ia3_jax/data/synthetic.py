"""A deterministic synthetic multitask text suite for the bundled demo model.

Pre-trained T0 weights cannot be downloaded everywhere, so ia3-jax trains its
own tiny T5 on a T0-style multitask mixture of small text tasks built from
lists of real English words (animals, foods, colours, vehicles, countries,
musical instruments, sentiment adjectives, number words, antonym pairs), and
holds out task *families* for zero-shot / few-shot evaluation, as T0 does.

Training families teach the model features (the category of a word, the
polarity of a review, the order of number words, antonyms) through several
prompt templates each. Held-out families ask for those same features through
task formats and answer phrasings never seen in training, so the model is
close to chance zero-shot, and a few examples are enough for (IA)^3 to learn
the new read-out.

Every family yields plain dicts (its fields plus `label`, the index of the
correct answer in the templates' answer choices), ready for
`ia3_jax.data.sources.InMemorySource` and the promptsource-format templates in
`ia3_jax/tasks/demo/templates/<family>.yaml`. Splits are disjoint (no example appears
in two splits of a family) and depend only on (family, split sizes, seed):
sampling uses NumPy's `RandomState`, whose stream is frozen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Callable, Mapping, Sequence

import numpy as np

Example = dict[str, Any]

# --------------------------------------------------------------------------- word lists

CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "animal": ("cat", "dog", "horse", "cow", "tiger", "lion", "rabbit", "mouse", "elephant",
               "monkey", "bear", "wolf", "fox", "sheep", "duck", "frog"),
    "food": ("bread", "cheese", "apple", "banana", "rice", "soup", "pizza", "pasta", "cake",
             "carrot", "potato", "salad", "egg", "butter", "honey", "cookie"),
    "colour": ("red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white",
               "grey", "violet", "gold", "silver", "navy", "crimson", "indigo"),
    "vehicle": ("car", "bus", "train", "bicycle", "truck", "boat", "ship", "plane", "taxi", "tram",
                "scooter", "van", "tractor", "helicopter", "canoe", "rocket"),
    "country": ("France", "Japan", "Brazil", "Canada", "Egypt", "India", "Kenya", "Mexico",
                "Norway", "Peru", "Spain", "Italy", "Chile", "China", "Ghana", "Greece"),
    "instrument": ("piano", "guitar", "violin", "drum", "flute", "trumpet", "harp", "cello",
                   "saxophone", "clarinet", "banjo", "organ", "tuba", "ukulele", "oboe",
                   "trombone"),
}
CATEGORIES: tuple[str, ...] = tuple(CATEGORY_WORDS)

POSITIVE_ADJECTIVES = ("great", "wonderful", "excellent", "delicious", "friendly", "lovely",
                       "amazing", "pleasant", "fantastic", "perfect", "tasty", "brilliant", "fresh",
                       "cozy", "charming", "superb", "nice", "helpful", "beautiful", "clean",
                       "good", "fabulous")
NEGATIVE_ADJECTIVES = ("awful", "terrible", "boring", "rude", "dirty", "horrible", "bland",
                       "disappointing", "noisy", "stale", "slow", "greasy", "dreadful", "poor",
                       "nasty", "ugly", "unhelpful", "bad", "mediocre", "awkward", "smelly",
                       "miserable")
INTENSIFIERS = ("", "", "", "very ", "really ", "quite ", "truly ", "so ")
REVIEW_SUBJECTS = ("food", "service", "staff", "room", "music", "coffee", "waiter", "view", "price",
                   "bed", "movie", "story", "ending", "hotel", "menu", "dessert", "owner",
                   "breakfast", "garden", "trip", "show", "concert", "shop", "lunch")
REVIEW_FRAMES = ("The {s} was {i}{a}.", "The {s} is {i}{a}.", "I found the {s} {i}{a}.",
                 "Honestly, the {s} was {i}{a}.", "We thought the {s} was {i}{a}.")

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen", "nineteen", "twenty")

ANTONYMS = (("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"),
            ("old", "young"), ("tall", "short"), ("light", "dark"), ("early", "late"),
            ("rich", "poor"), ("strong", "weak"), ("wet", "dry"), ("loud", "quiet"),
            ("full", "empty"), ("hard", "soft"), ("high", "low"), ("open", "closed"),
            ("clean", "dirty"), ("heavy", "light"), ("thick", "thin"), ("wide", "narrow"),
            ("near", "far"), ("first", "last"), ("sweet", "sour"), ("brave", "afraid"),
            ("true", "false"), ("up", "down"), ("left", "right"), ("day", "night"),
            ("win", "lose"), ("buy", "sell"))

NAMES = ("Anna", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack", "Kate",
         "Liam", "Maria", "Noah", "Olga", "Paul", "Rosa", "Sam", "Tina", "Victor", "Wendy", "Yusuf",
         "Zoe", "Omar")
TOPIC_FRAMES = ("{n} wrote the word {w} on the board.", "The last word on the list was {w}.",
                "{n} kept talking about {w}.", "Yesterday {n} dreamed about {w}.",
                "The card in the box said {w}.", "{n} said {w} twice.",
                "Nobody expected {n} to mention {w}.", "The next clue is {w}.",
                "{n} asked a question about {w}.")


def category_of(word: str) -> str:
  """The category of a word of `CATEGORY_WORDS`."""
  for category, words in CATEGORY_WORDS.items():
    if word in words:
      return category
  raise KeyError(f"{word!r} is not in any category")


def _choice(rng: np.random.RandomState, items: Sequence[Any]) -> Any:
  return items[rng.randint(len(items))]


def _sample(rng: np.random.RandomState, items: Sequence[Any], k: int) -> list[Any]:
  return [items[i] for i in rng.choice(len(items), size=k, replace=False)]


def _word(rng: np.random.RandomState, category: str | None = None) -> str:
  return _choice(rng, CATEGORY_WORDS[category or _choice(rng, CATEGORIES)])


def _review(rng: np.random.RandomState, positive: bool) -> str:
  adjectives = POSITIVE_ADJECTIVES if positive else NEGATIVE_ADJECTIVES
  subjects = _sample(rng, REVIEW_SUBJECTS, rng.randint(1, 3))
  return " ".join(_choice(rng, REVIEW_FRAMES).format(s=s, i=_choice(rng, INTENSIFIERS),
                                                     a=_choice(rng, adjectives))
                  for s in subjects)


# --------------------------------------------------------------------------- families
# Each generator draws one example. Binary labels are balanced by the caller's
# draw (rng.randint(2)); label semantics are documented in the template files.


def _sentiment(rng: np.random.RandomState) -> Example:
  label = int(rng.randint(2))  # 0 negative, 1 positive
  return {"review": _review(rng, positive=bool(label)), "label": label}


def _topic(rng: np.random.RandomState) -> Example:
  label = int(rng.randint(len(CATEGORIES)))
  word = _word(rng, CATEGORIES[label])
  sentence = _choice(rng, TOPIC_FRAMES).format(n=_choice(rng, NAMES), w=word)
  return {"sentence": sentence, "word": word, "label": label}


def _membership(rng: np.random.RandomState) -> Example:
  category = _choice(rng, CATEGORIES)
  label = int(rng.randint(2))  # 0 yes (the word is in the category), 1 no
  if label == 0:
    word = _word(rng, category)
  else:
    word = _word(rng, _choice(rng, [c for c in CATEGORIES if c != category]))
  return {"word": word, "category": category, "label": label}


def _compare(rng: np.random.RandomState) -> Example:
  a, b = _sample(rng, range(len(NUMBER_WORDS)), 2)
  return {"first": NUMBER_WORDS[a], "second": NUMBER_WORDS[b],
          "label": 0 if a > b else 1}  # 0: the first number is larger


def _antonym(rng: np.random.RandomState) -> Example:
  pair = _choice(rng, ANTONYMS)
  word, answer = (pair if rng.randint(2) else pair[::-1])
  excluded = {w for p in ANTONYMS if word in p for w in p}
  others = sorted({w for p in ANTONYMS for w in p} - excluded)
  options = _sample(rng, others, 2) + [answer]
  order = rng.permutation(3)
  options = [options[i] for i in order]
  return {"word": word, "options": options, "label": options.index(answer)}


def _recommend(rng: np.random.RandomState) -> Example:
  label = int(rng.randint(2))  # 0 yes (positive review: recommended), 1 no
  return {"review": _review(rng, positive=label == 0), "label": label}


def _property(category: str) -> Callable[[np.random.RandomState], Example]:
  """Yes/no: is a word of `category` (label 0) or of another category (label 1)."""
  def generate(rng: np.random.RandomState) -> Example:
    label = int(rng.randint(2))
    other = _choice(rng, [c for c in CATEGORIES if c != category])
    return {"name": _choice(rng, NAMES), "word": _word(rng, category if label == 0 else other),
            "label": label}
  return generate


@dataclasses.dataclass(frozen=True)
class Family:
  """A task family: an example generator, its number of answer choices, its role."""
  name: str
  generate: Callable[[np.random.RandomState], Example]
  num_choices: int
  held_out: bool
  description: str


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sentiment", _sentiment, 2, False, "polarity of a short review"),
    Family("topic", _topic, len(CATEGORIES), False, "category of the content word of a sentence"),
    Family("membership", _membership, 2, False, "is a word in a category (yes/no)"),
    Family("compare", _compare, 2, False, "which of two number words is larger"),
    Family("antonym", _antonym, 3, False, "the opposite of a word among three options"),
    Family("recommend", _recommend, 2, True, "would the writer of a review recommend it"),
    Family("edible", _property("food"), 2, True, "can you eat it (a food word or not)"),
    Family("alive", _property("animal"), 2, True, "is it alive (an animal word or not)"),
)}
TRAINING_FAMILIES: tuple[str, ...] = tuple(n for n, f in FAMILIES.items() if not f.held_out)
HELD_OUT_FAMILIES: tuple[str, ...] = tuple(n for n, f in FAMILIES.items() if f.held_out)


def _seed(family: str, seed: int) -> int:
  digest = hashlib.sha256(f"ia3-jax synthetic {family} {seed}".encode()).digest()
  return int.from_bytes(digest[:4], "little")


def generate_splits(family: str, sizes: Mapping[str, int], seed: int = 0, *,
                    repeats_in: Sequence[str] = ("train",)) -> dict[str, list[Example]]:
  """Disjoint splits of `family`: {split: examples}, filled in the order of `sizes`.

  Examples are drawn i.i.d. from the family; a draw that already belongs to an
  earlier split is skipped, so no example is in two splits. Within a split
  named in `repeats_in` an example may repeat (a large training split of a
  family with few distinct examples); other splits hold distinct examples.
  Put evaluation splits first so they keep the family's full distribution.
  Raises ValueError when the family has too few distinct examples.
  """
  if family not in FAMILIES:
    raise KeyError(f"unknown synthetic family {family!r}; families: {', '.join(FAMILIES)}")
  for split, size in sizes.items():
    if not isinstance(size, (int, np.integer)) or size < 0:
      raise ValueError(f"split {split!r}: size must be a non-negative int, got {size!r}")
  generate = FAMILIES[family].generate
  rng = np.random.RandomState(_seed(family, seed))
  earlier: set[str] = set()
  out: dict[str, list[Example]] = {}
  for split, size in sizes.items():
    rows: list[Example] = []
    mine: set[str] = set()
    budget = 50 * size + 1000  # draws before giving up
    while len(rows) < size:
      if budget == 0:
        raise ValueError(f"synthetic family {family!r}: split {split!r} needs {size} distinct "
                         f"examples not in earlier splits; found {len(rows)}")
      budget -= 1
      example = generate(rng)
      key = json.dumps(example, sort_keys=True)
      if key in earlier or (key in mine and split not in repeats_in):
        continue
      mine.add(key)
      rows.append(example)
    earlier |= mine
    out[split] = rows
  return out


def vocabulary_words() -> list[str]:
  """Every word of the word lists (for checks and the SentencePiece corpus)."""
  words = [w for ws in CATEGORY_WORDS.values() for w in ws]
  words += list(CATEGORIES) + list(POSITIVE_ADJECTIVES) + list(NEGATIVE_ADJECTIVES)
  words += list(REVIEW_SUBJECTS) + list(NUMBER_WORDS) + [w for p in ANTONYMS for w in p]
  words += list(NAMES)
  return sorted(set(words))


# --------------------------------------------------------------------------- vocabulary

def corpus(template_dir: str, num_per_family: int = 2000, seed: int = 0) -> list[str]:
  """Rendered inputs and answer choices of every family through every template.

  The text a SentencePiece vocabulary for the suite is trained on (held-out
  families included: a real T5 vocabulary covers the words of every task too).
  """
  import os  # pylint: disable=g-import-not-at-top
  from ia3_jax.data.templates import load_templates  # pylint: disable=g-import-not-at-top
  lines: list[str] = []
  for family in FAMILIES:
    templates = load_templates(os.path.join(template_dir, f"{family}.yaml"))
    rows = generate_splits(family, {"train": num_per_family}, seed)["train"]
    for i, example in enumerate(rows):
      rendered = templates.templates[i % len(templates)].render(example, where=f"{family} {i}")
      lines.append(rendered.inputs)
      lines.extend(rendered.choices or (rendered.target,))
  return lines


def train_sentencepiece(lines: Sequence[str], model_prefix: str, vocab_size: int = 800) -> str:
  """Trains a unigram SentencePiece model with T5's ids (pad 0, eos 1, unk 2, no bos).

  Returns the path of the `.model` file. Deterministic for the same lines
  (one thread, no sampling of the input).
  """
  import io  # pylint: disable=g-import-not-at-top
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
      model_type="unigram", character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
      max_sentence_length=4096, minloglevel=2)
  path = f"{model_prefix}.model"
  with open(path, "wb") as f:
    f.write(model.getvalue())
  return path
