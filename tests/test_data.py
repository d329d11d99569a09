"""get_batches on a user's JSONL task: layout, training determinism and resume, evaluation
coverage, sharding, and errors that name file, line, template and field."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.data_fixtures import spm_model_path, vocabulary
from ia3_jax import data
from ia3_jax.data.templates import DataError

TEMPLATES = textwrap.dedent("""\
    dataset: sentiment
    templates:
      - name: is it positive
        answer_choices: negative ||| positive
        jinja: "{{ text }} Is this review positive or negative? ||| {{ answer_choices[label] }}"
        metadata: {original_task: true}
      - name: did they like it
        answer_choices: No ||| Yes
        jinja: "Review: {{ text }} Did the reviewer like it? ||| {{ answer_choices[label] }}"
        metadata: {original_task: true}
      - name: by name
        answer_choices: negative ||| neutral ||| positive
        jinja: "{{ text }} The sentiment is ||| {{ sentiment }}"
        metadata: {original_task: true}
    """)
LENGTHS = {"inputs": 64, "targets": 16, "num_choices": 3}
WORDS = "the movie was good bad great awful fine plot actor story".split()


def _write_task(tmp, n_train=40, n_val=21):
  rng = np.random.default_rng(0)
  paths = {}
  for split, n in (("train", n_train), ("validation", n_val)):
    rows = []
    for i in range(n):
      label = int(rng.integers(0, 2))
      rows.append({"text": " ".join(rng.choice(WORDS, 6)) + f" {i}", "label": label,
                   "sentiment": ["negative", "positive"][label]})
    paths[split] = tmp / f"{split}.jsonl"
    paths[split].write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  (tmp / "templates.yaml").write_text(TEMPLATES)
  return paths


@pytest.fixture(scope="module")
def user_task(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("user")
  paths = _write_task(tmp)
  reg = data.register_task("sentiment", paths, tmp / "templates.yaml", vocabulary=vocabulary(),
                           num_shots=16, seeds=(0, 1), task_id=77)
  return reg, paths


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_registration_names_and_layout(user_task):
  reg, _ = user_task
  assert reg.train == ("sentiment_fewshot_seed0", "sentiment_fewshot_seed1")
  assert reg.eval == ("sentiment_eval_is_it_positive", "sentiment_eval_did_they_like_it",
                      "sentiment_eval_by_name")
  assert reg.eval_mixture == "sentiment_eval"
  assert data.task_id("sentiment") == 77
  batch = next(data.get_batches("sentiment_fewshot_seed0", "train", 4, LENGTHS, seed=3))
  shapes = {k: v.shape for k, v in batch.items()}
  assert shapes["encoder_input_tokens"] == (4, 64) and shapes["choice_tokens"] == (4, 3, 16)
  assert shapes["choice_mask"] == (4, 3) and shapes["label"] == (4,) and shapes["task_id"] == (4,)
  assert all(v.dtype == np.int32 for v in batch.values())
  assert (batch["task_id"] == 77).all() and (batch["example_mask"] == 1).all()
  # Every choice ends in EOS=1 and is 0-padded; the padding choice of 2-choice templates is empty.
  for row, mask in zip(batch["choice_tokens"], batch["choice_mask"]):
    for choice, real in zip(row, mask):
      if real:
        n = int((choice != 0).sum())
        assert choice[n - 1] == 1 and not choice[n:].any()
      else:
        assert not choice.any()
  vocab = vocabulary()
  i = 0
  choice_text = vocab.decode(batch["choice_tokens"][i, batch["label"][i]].tolist())
  assert choice_text in ("negative", "positive", "No", "Yes")


def test_training_stream_is_deterministic_and_resumable(user_task):
  first = _take(data.get_batches("sentiment_fewshot_seed0", None, 4, LENGTHS, seed=5), 12)
  resumed = _take(data.get_batches("sentiment_fewshot_seed0", None, 4, LENGTHS, seed=5, start_step=7), 5)
  other = _take(data.get_batches("sentiment_fewshot_seed0", None, 4, LENGTHS, seed=6), 12)
  for a, b in zip(first[7:], resumed):  # same seed, same stream (also in another process, below)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert any((a["example_id"] != b["example_id"]).any() for a, b in zip(first, other))
  # 16 few-shot examples, repeated; each drawn with a random template, changing across epochs.
  ids = np.concatenate([b["example_id"] for b in first])
  assert len(set(ids.tolist())) == 16
  pairs = {(e, t) for b in first for e, t in zip(b["example_id"], b["template_id"])}
  assert {t for _, t in pairs} == {0, 1, 2}
  assert any(len({t for e2, t in pairs if e2 == e}) > 1 for e in set(ids.tolist()))
  # Different few-shot seeds pick different examples.
  ids1 = np.concatenate([b["example_id"] for b in _take(
      data.get_batches("sentiment_fewshot_seed1", None, 4, LENGTHS, seed=5), 12)])
  assert set(ids1.tolist()) != set(ids.tolist()) and len(set(ids1.tolist())) == 16


_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np, seqio
    from ia3_jax import data
    paths = json.loads(sys.argv[2])
    data.register_task("sentiment", paths, sys.argv[3], vocabulary=seqio.SentencePieceVocabulary(sys.argv[1]),
                       num_shots=16, seeds=(0,), task_id=77)
    it = data.get_batches("sentiment_fewshot_seed0", None, 4, json.loads(sys.argv[4]), seed=5)
    print(json.dumps([{k: v.tolist() for k, v in next(it).items()} for _ in range(6)]))
    """)


def test_training_stream_identical_in_another_process(user_task):
  _, paths = user_task
  tmpl = str(paths["train"].parent / "templates.yaml")
  out = subprocess.run([sys.executable, "-c", _CHILD, spm_model_path(),
                        json.dumps({k: str(v) for k, v in paths.items()}), tmpl, json.dumps(LENGTHS)],
                       check=True, capture_output=True, text=True).stdout
  child = json.loads(out.strip().splitlines()[-1])
  here = _take(data.get_batches("sentiment_fewshot_seed0", None, 4, LENGTHS, seed=5), 6)
  for c, h in zip(child, here):
    for k in h:
      np.testing.assert_array_equal(np.array(c[k]), h[k])


def test_evaluation_covers_every_example_once_with_padding(user_task):
  it = data.get_batches("sentiment_eval", None, 8, LENGTHS)  # 3 templates x 21 examples
  batches = list(it)
  assert it.num_batches == len(batches) == 8
  rows = [(t, e) for b in batches for t, e, m in zip(b["template_id"], b["example_id"], b["example_mask"]) if m]
  assert sorted(rows) == sorted((t, e) for t in range(3) for e in range(21))
  last = batches[-1]
  assert last["example_mask"].tolist() == [1] * 7 + [0]
  assert last["choice_mask"][-1].tolist() == [1, 0, 0] and last["example_id"][-1] == -1
  for b in batches:
    real = b["example_mask"].astype(bool)
    assert (b["choice_mask"][real].sum(1) == np.where(b["template_id"][real] == 2, 3, 2)).all()
  assert it.stats.examples == 63


def test_evaluation_shards_agree_on_batch_count(user_task):
  shards = [list(data.get_batches("sentiment_eval_by_name", "validation", 4, LENGTHS, shard_id=i,
                                  num_shards=2)) for i in range(2)]
  assert len(shards[0]) == len(shards[1]) == 3  # ceil(ceil(21 / 2) / 4)
  ids = [e for s in shards for b in s for e, m in zip(b["example_id"], b["example_mask"]) if m]
  assert sorted(ids) == list(range(21))


def test_lm_only_and_task_id_map(user_task):
  it = data.get_batches("sentiment_fewshot_seed0", None, 4, {"inputs": 64, "targets": 16, "num_choices": 1},
                        task_id_map={"sentiment": 3})
  batch = next(it)
  assert batch["choice_tokens"].shape == (4, 1, 16) and (batch["label"] == 0).all()
  assert (batch["task_id"] == 3).all()


def test_truncation_report_counts(user_task):
  stats = data.truncation_report("sentiment_eval_is_it_positive", "validation",
                                 {"inputs": 6, "targets": 2, "num_choices": 2})
  assert stats.examples == 21 and stats.inputs_truncated == 21
  assert stats.max_inputs_length > 6 and stats.choices_truncated == stats.examples_with_choices_truncated * 1 + (
      stats.choices_truncated - stats.examples_with_choices_truncated)


def test_unknown_task_name():
  with pytest.raises(DataError, match=r"unknown task or mixture name 'sentiment_evl'; did you mean .*'sentiment_eval'"):
    data.get_batches("sentiment_evl", None, 4, LENGTHS)


def _bad_task(tmp_path, lines, templates=TEMPLATES, key="bad"):
  (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
  (tmp_path / "t.yaml").write_text(templates)
  data.register_task(key, {"train": tmp_path / "train.jsonl"}, tmp_path / "t.yaml",
                     vocabulary=vocabulary(), task_id=None)
  data.clear_cache()
  return str(tmp_path / "train.jsonl"), str(tmp_path / "t.yaml")


GOOD = '{"text": "fine", "label": 1, "sentiment": "positive"}'


def test_error_line_not_json(tmp_path):
  path, _ = _bad_task(tmp_path, [GOOD, '{"text": "oops"'])
  with pytest.raises(DataError, match=rf"{path}, line 2: not valid JSON"):
    next(data.get_batches("bad_eval", "train", 2, LENGTHS))


def test_error_missing_field(tmp_path):
  path, tmpl = _bad_task(tmp_path, [GOOD, '{"txt": "typo", "label": 0, "sentiment": "negative"}'])
  with pytest.raises(DataError, match=rf"{path}, line 2: template 'is it positive' \({tmpl}:3\): field "
                                      r"'jinja': missing field 'text'"):
    next(data.get_batches("bad_eval_is_it_positive", "train", 2, LENGTHS))


def test_error_label_outside_choices(tmp_path):
  path, tmpl = _bad_task(tmp_path, [GOOD, '{"text": "meh", "label": 0, "sentiment": "mixed"}'])
  with pytest.raises(DataError, match=rf"{path}, line 2: template 'by name' \({tmpl}:11\): label outside "
                                      r"the choices: target 'mixed'.*field 'sentiment' = 'mixed'"):
    next(data.get_batches("bad_eval_by_name", "train", 2, LENGTHS))


def test_error_template_renders_empty(tmp_path):
  path, tmpl = _bad_task(tmp_path, [GOOD, '{"text": "", "label": 0, "sentiment": "negative"}'],
                         templates=TEMPLATES.replace('"{{ text }} The sentiment is', '"{{ text }}'))
  with pytest.raises(DataError, match=rf"{path}, line 2: template 'by name' \({tmpl}:11\): renders an "
                                      r"empty input \(field 'text' = ''\)"):
    next(data.get_batches("bad_eval_by_name", "train", 2, LENGTHS))


def test_error_too_many_choices_for_num_choices(tmp_path):
  _bad_task(tmp_path, [GOOD.replace('"positive"', '"positive"').replace('"label": 1', '"label": 1')])
  with pytest.raises(DataError, match="Correct choice .label. outside the kept choices"):
    list(data.get_batches("bad_eval_by_name", "train", 2, {"inputs": 32, "targets": 8, "num_choices": 2}))


def test_training_shards_split_the_few_shot_examples(user_task):
  ids = []
  for shard in range(2):
    it = data.get_batches("sentiment_fewshot_seed0", None, 4, LENGTHS, seed=5, shard_id=shard, num_shards=2)
    ids.append({int(e) for b in _take(it, 20) for e in b["example_id"]})
  assert len(ids[0]) == len(ids[1]) == 8 and not ids[0] & ids[1]


def test_whole_split_training_streams_and_reports_bad_lines(tmp_path):
  (tmp_path / "t.yaml").write_text(TEMPLATES)
  lines = [GOOD] * 5 + ['{"text": "broken"'] + [GOOD] * 5
  (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
  reg = data.register_task("streamed", {"train": tmp_path / "train.jsonl"}, tmp_path / "t.yaml",
                           vocabulary=vocabulary())
  assert reg.train == ("streamed_train",)
  it = data.get_batches("streamed_train", None, 2, LENGTHS, shuffle=False)
  batches = _take(it, 2)  # examples before the bad line arrive: the split is streamed
  assert [int(e) for b in batches for e in b["example_id"]] == [0, 1, 2, 3]
  with pytest.raises(DataError, match=rf"streamed_train: .*{tmp_path / 'train.jsonl'}, line 6: not valid JSON"):
    _take(it, 3)


def test_default_vocabulary_is_the_models_own_never_a_download(tmp_path, monkeypatch):
  """register_task without vocabulary=: the run's model's spiece.model, resolved when the task
  tokenizes ($IA3_JAX_SPM_PATH, else gin's INITIAL_CHECKPOINT_PATH), else a ConfigError."""
  import gin
  from ia3_jax.demo import BUNDLED_MODEL_DIR
  from ia3_jax.errors import ConfigError
  from ia3_jax.interop import hf_checkpoints
  monkeypatch.delenv("IA3_JAX_SPM_PATH", raising=False)
  from ia3_jax.data import vocabularies
  monkeypatch.setattr(vocabularies, "_DEFAULT_VOCAB", None)
  assert not str(getattr(data.default_vocabulary(), "sentencepiece_model_file", "")).startswith("gs://")
  paths = _write_task(tmp_path, n_train=8, n_val=3)
  data.register_task("modelvocab", paths, tmp_path / "templates.yaml")
  with pytest.raises(ConfigError, match=r"no vocabulary .*vocabulary=.*INITIAL_CHECKPOINT_PATH"):
    next(iter(data.get_batches("modelvocab_eval", None, 4, LENGTHS)))

  def first_prompt_tokens():
    batch = next(iter(data.get_batches("modelvocab_eval_by_name", None, 4, LENGTHS)))
    return [int(t) for t in batch["encoder_input_tokens"][0] if t > 1]
  prompt = data.rendered_examples("modelvocab_eval_by_name")[0]["inputs"][0]
  gin.parse_config(f"INITIAL_CHECKPOINT_PATH = '{BUNDLED_MODEL_DIR}'")  # what a gin run binds
  assert first_prompt_tokens() == hf_checkpoints.load_vocabulary(BUNDLED_MODEL_DIR).encode(prompt)
  monkeypatch.setenv("IA3_JAX_SPM_PATH", spm_model_path())
  assert first_prompt_tokens() == vocabulary().encode(prompt)
