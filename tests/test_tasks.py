"""Built-in tasks: every TFDS-backed dataset under tfds.testing.mock_data, RAFT from CSV files,
promptsource checkouts, task ids and registration."""

import csv
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ia3_jax import data, tasks
from ia3_jax.data import fewshot
from ia3_jax.data.templates import DataError
from ia3_jax.tasks import pretrain, raft, t0
from tests.data_fixtures import valid_mock_as_dataset, vocabulary

N_POOL = 80  # examples in a few-shot pool split: >= the largest k (StoryCloze, 70)
N_EVAL = 12  # examples in every other split


def _mock_size(builder: str, split: str) -> int:
  pool = split in ("train", "train_xl") or (builder == "story_cloze" and split == "validation")
  return N_POOL if pool else N_EVAL
LENGTHS = {"inputs": 96, "targets": 24, "num_choices": 4}


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
  root = tmp_path_factory.mktemp("tasks")
  manual = root / "manual"
  manual.mkdir()
  for name in ("cloze_test_val__spring2016.csv", "cloze_test_test__spring2016.csv"):
    (manual / name).write_text("InputStoryid\n")  # present; the rows come from mock data
  raft_dir = root / "raft" / "data"
  rng = np.random.default_rng(0)
  for task, (fields, labels) in raft.RAFT_TASKS.items():
    (raft_dir / task).mkdir(parents=True)
    for split, n in (("train.csv", 50), ("test_unlabeled.csv", 7)):
      with open(raft_dir / task / split, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(fields) + ["ID", "Label"])
        for i in range(n):
          label = int(rng.integers(1, len(labels) + 1)) if split == "train.csv" else 0
          w.writerow([f"{field} text {i}" for field in fields] + [i, label])
  data.clear_cache()
  dirs = {"manual_dir": str(manual), "raft_dir": str(root / "raft")}
  names = tasks.register_all(vocabulary(), **dirs)
  yield names, dirs
  data.clear_cache()


@pytest.fixture
def mock():
  data.clear_cache()
  with tfds.testing.mock_data(num_examples=N_EVAL, as_dataset_fn=valid_mock_as_dataset(_mock_size)):
    yield
  data.clear_cache()


def test_registration_is_complete_and_idempotent(registered):
  registered, dirs = registered
  names = set(registered)
  for key in tasks.T0_HELDOUT_KEYS + tasks.RAFT_KEYS:
    assert {f"{key}_fewshot_seed{s}" for s in fewshot.TFEW_SEEDS} <= names
    assert f"{key}_eval" in names
  for key in tasks.T0_HELDOUT_KEYS:
    evals = [n for n in data.registered_names(key) if n.startswith(f"{key}_eval_")]
    assert len(evals) >= 4, key  # several templates per dataset
  assert {f"{k}_train" for k in tasks.PRETRAIN_KEYS} | {"t0_pretrain_multitask"} <= names
  assert {f"t0_heldout_fewshot_seed{s}" for s in fewshot.TFEW_SEEDS} <= names
  before = {n: data.get_task_info(n) for n in registered}
  assert tasks.register_all(vocabulary(), **dirs) == registered  # idempotent: nothing re-created
  assert all(data.get_task_info(n) is before[n] for n in registered)
  ids = data.task_ids()
  assert all(ids[k] == v for k, v in tasks.BUILTIN_TASK_IDS.items())
  assert [ids[k] for k in tasks.T0_HELDOUT_KEYS] == list(range(11))
  defaults = {k: data.get_task_info(f"{k}_eval").default_split for k in tasks.T0_HELDOUT_KEYS}
  assert defaults["anli_r1"] == defaults["story_cloze"] == "test" and defaults["rte"] == "validation"


@pytest.mark.parametrize("key", tasks.T0_HELDOUT_KEYS + tasks.PRETRAIN_KEYS)
def test_every_template_renders_every_mock_example(registered, mock, key):
  spec_choices = (t0.T0_HELDOUT[key][4] if key in t0.T0_HELDOUT else pretrain.PRETRAIN[key][3])
  for name in data.registered_names(key):
    info = data.get_task_info(name)
    if info.kind != "eval" or name == f"{key}_eval":
      continue
    splits_pool = fewshot.TFEW_SETUPS[key].train_split if key in fewshot.TFEW_SETUPS else "train"
    splits = {info.default_split, splits_pool}
    for split in splits:
      rows = data.rendered_examples(name, split)
      assert len(rows) == (N_POOL if split == splits_pool else N_EVAL)
      for row in rows:
        assert row["inputs"][0].strip(), (name, row)
        assert len(row["choices"][0]) == (spec_choices or 1), (name, row)
        assert all(c.strip() for c in row["choices"][0])
        assert 0 <= row["label"][0] < len(row["choices"][0])
        assert row["choices"][0][row["label"][0]] == row["targets"][0]


@pytest.mark.parametrize("key", tasks.T0_HELDOUT_KEYS)
def test_tfds_tasks_yield_correct_batches(registered, mock, key):
  num_choices = t0.T0_HELDOUT[key][4]
  # Evaluation: all templates, every example once, in the batch layout.
  it = data.get_batches(f"{key}_eval", None, 64, LENGTHS)
  num_templates = len(data.get_task_info(f"{key}_eval").template_names)
  seen = set()
  for b in it:
    real = b["example_mask"].astype(bool)
    assert b["encoder_input_tokens"].shape == (64, 96) and b["choice_tokens"].shape == (64, 4, 24)
    assert (b["choice_mask"][real].sum(1) == num_choices).all()
    assert (b["inputs_length"][real] >= 2).all()  # a non-empty input plus EOS
    assert (b["label"][real] < num_choices).all() and (b["label"][real] >= 0).all()
    assert (b["task_id"] == tasks.BUILTIN_TASK_IDS[key]).all()
    seen |= set(zip(b["template_id"][real].tolist(), b["example_id"][real].tolist()))
  assert seen == {(t, e) for t in range(num_templates) for e in range(N_EVAL)}
  # Few-shot training set: exactly the T-Few k examples of the seed, from the T-Few split.
  k = fewshot.TFEW_SETUPS[key].num_shots
  rows = data.rendered_examples(f"{key}_fewshot_seed42")
  assert [r["example_id"] for r in rows] == fewshot.sample_indices(N_POOL, k, 42).tolist()
  assert all(len(r["inputs"]) == num_templates for r in rows)  # every template, drawn per example
  batch = next(data.get_batches(f"{key}_fewshot_seed0", None, 8, LENGTHS, seed=1))
  assert (batch["choice_mask"].sum(1) == num_choices).all() and batch["label"].max() < num_choices
  sample0 = set(fewshot.sample_indices(N_POOL, k, 0).tolist())
  assert set(batch["example_id"].tolist()) <= sample0


def test_pretraining_mixture_yields_lm_batches(registered, mock):
  # Unshuffled: seqio's shuffle buffer (1000 rows of every task, repeated mock epochs) would be
  # most of the test's time; the mixture still samples its tasks at random.
  it = data.get_batches(pretrain.MIXTURE, None, 16, {"inputs": 96, "targets": 24, "num_choices": 1},
                        shuffle=False)
  batches = [next(it) for _ in range(4)]
  ids = {int(t) for b in batches for t in b["task_id"]}
  assert ids <= {tasks.BUILTIN_TASK_IDS[k] for k in tasks.PRETRAIN_KEYS} and len(ids) >= 3
  for b in batches:
    assert b["choice_tokens"].shape == (16, 1, 24) and (b["label"] == 0).all()
    assert (b["choice_mask"] == 1).all()


def test_default_mock_data_breaks_validation_loudly(registered):
  """Plain mock data gives HellaSwag 5-50 random endings: the task says so instead of batching."""
  data.clear_cache()
  with tfds.testing.mock_data(num_examples=3):
    with pytest.raises(DataError, match=r"tfds hellaswag: split 'validation', example 0: template "
                                        r"'how does it continue' .*(label outside the choices|renders \d+ "
                                        r"answer choices; dataset 'hellaswag' expects 4)"):
      data.rendered_examples("hellaswag_eval_how_does_it_continue")
    with pytest.raises(DataError, match=r"story_cloze/2016: split 'test', example 0: ValueError: field"):
      data.rendered_examples("story_cloze_eval_plain_story")
  data.clear_cache()


def test_raft_tasks_from_csv(registered):
  for key in tasks.RAFT_KEYS:
    task = key[len("raft_"):]
    labels = raft.RAFT_TASKS[task][1]
    rows = data.rendered_examples(f"{key}_fewshot_seed0")
    assert len(rows) == 50 and sorted(r["example_id"] for r in rows) == list(range(50))
    text = rows[0]["inputs"][0]
    assert "Possible labels:\n1. " + labels[0] in text and text.endswith("Label:")
    for field in raft.RAFT_TASKS[task][0]:
      assert f"\n{field}: {field} text" in text
    test_rows = data.rendered_examples(f"{key}_eval_raft_format")  # default split: test
    assert len(test_rows) == 7 and all(r["label"] == [-1] for r in test_rows)
  it = data.get_batches("raft_banking_77_fewshot_seed1", None, 4, {"inputs": 900, "targets": 24,
                                                                   "num_choices": 77})
  b = next(it)
  assert b["choice_tokens"].shape == (4, 77, 24) and (b["choice_mask"].sum(1) == 77).all()
  evals = list(data.get_batches("raft_ade_corpus_v2_eval", None, 4, {"inputs": 256, "targets": 16,
                                                                       "num_choices": 2}))
  labels = np.concatenate([e["label"][e["example_mask"] == 1] for e in evals])
  assert len(labels) == 7 and (labels == -1).all()


def test_raft_without_data_dir_says_where_to_put_it(registered, monkeypatch):
  monkeypatch.delenv("IA3_JAX_RAFT_DIR", raising=False)
  src = raft.RaftSource("overruling", None)
  with pytest.raises(DataError, match="RAFT data directory not set.*IA3_JAX_RAFT_DIR"):
    src.load("train")
  with pytest.raises(ValueError, match=r"field 'Label' = 3 is outside 1..2"):
    raft.label_index("3", ("a", "b"))


def test_promptsource_checkout_replaces_our_templates(registered, tmp_path, mock):
  pairs = {v[3]: v[4] for v in t0.T0_HELDOUT.values()}
  for (dataset, subset), n in pairs.items():
    choices = " ||| ".join("ABCD"[:n])
    folder = tmp_path / "promptsource" / "templates" / dataset / (subset or "")
    folder.mkdir(parents=True, exist_ok=True)
    jinja = "{{ premise }} ok? ||| {{ answer_choices[0] }}"
    (folder / "templates.yaml").write_text(textwrap.dedent(f"""\
        dataset: {dataset}
        templates:
          id-a: !Template
            answer_choices: {choices}
            id: id-a
            jinja: 'ORIGINAL {jinja}'
            metadata: !TemplateMetadata {{original_task: true, choices_in_prompt: false}}
            name: original
            reference: ''
          id-b: !Template
            answer_choices: {choices}
            id: id-b
            jinja: 'OTHER {jinja}'
            metadata: !TemplateMetadata {{original_task: false}}
            name: not original
            reference: ''
        """))
  _, dirs = registered
  try:
    tasks.register_all(vocabulary(), **dirs, promptsource_dir=str(tmp_path), groups=("t0",))
    assert [n for n in data.registered_names("rte") if "_eval_" in n] == ["rte_eval_original"]
    rows = data.rendered_examples("anli_r2_eval_original")  # ANLI's context reaches templates as premise
    assert rows[0]["inputs"][0].startswith("ORIGINAL ") and rows[0]["inputs"][0].endswith(" ok?")
  finally:
    tasks.register_all(vocabulary(), **dirs, groups=("t0",))
  assert "rte_eval_does_this_imply" in data.registered_names("rte")


def test_promptsource_copa_question_specific_templates_skip_empty_renders(registered, tmp_path,
                                                                          mock, caplog):
  """promptsource COPA: a "cause"-only template renders empty on "effect" questions.

  Those renders are skipped and counted (T-Few keeps only valid renders); the
  generic template still renders every example. (The mock data's `question`
  is random text, so the stand-in condition compares two mock fields.)
  """
  for (dataset, subset), n in {v[3]: v[4] for v in t0.T0_HELDOUT.values()}.items():
    other = tmp_path / "promptsource" / "templates" / dataset / (subset or "")
    other.mkdir(parents=True, exist_ok=True)
    (other / "templates.yaml").write_text(textwrap.dedent(f"""\
        dataset: {dataset}
        templates:
          id-a: !Template
            answer_choices: {" ||| ".join("ABCD"[:n])}
            id: id-a
            jinja: '{{{{ premise }}}} ok? ||| {{{{ answer_choices[0] }}}}'
            metadata: !TemplateMetadata {{original_task: true, choices_in_prompt: false}}
            name: original
            reference: ''
        """))
  folder = tmp_path / "promptsource" / "templates" / "super_glue" / "copa"
  (folder / "templates.yaml").write_text(textwrap.dedent("""\
      dataset: super_glue
      subset: copa
      templates:
        id-a: !Template
          answer_choices: '{{choice1}} ||| {{choice2}}'
          id: id-a
          jinja: '{{ premise }} What is the {{ question }}? ||| {{ answer_choices[label] }}'
          metadata: !TemplateMetadata {original_task: true, choices_in_prompt: false}
          name: generic
          reference: ''
        id-b: !Template
          answer_choices: '{{choice1}} ||| {{choice2}}'
          id: id-b
          jinja: '{% if premise < choice1 %}{{ premise }} Why? ||| {{ answer_choices[label] }}{% endif %}'
          metadata: !TemplateMetadata {original_task: true, choices_in_prompt: false}
          name: cause only
          reference: ''
      """))
  _, dirs = registered
  try:
    tasks.register_all(vocabulary(), **dirs, promptsource_dir=str(tmp_path), groups=("t0",))
    generic = data.rendered_examples("copa_eval_generic")
    with caplog.at_level("WARNING"):
      cause = data.rendered_examples("copa_eval_cause_only")
    assert generic and all(r["inputs"][0].endswith("?") for r in generic)
    assert 0 < len(cause) < len(generic)
    assert all(r["inputs"][0].endswith("Why?") for r in cause)
    assert "were skipped" in caplog.text and "copa" in caplog.text
    train = data.rendered_examples("copa_fewshot_seed0")  # both templates per example
    assert all(len(r["inputs"]) == 2 for r in train)
  finally:
    tasks.register_all(vocabulary(), **dirs, groups=("t0",))
