"""Template format: promptsource YAML parsing, rendering semantics, sandboxing, errors."""

import glob
import os
import textwrap

import pytest

from ia3_jax.data import templates as tpl
from ia3_jax.data.templates import DataError

# A promptsource templates.yaml as promptsource writes it (tags, uuid keys, Jinja choices).
PROMPTSOURCE_YAML = textwrap.dedent("""\
    dataset: super_glue
    subset: copa
    templates:
      0edd8660-f299-4819-a5ac-633c11177228: !Template
        answer_choices: '{{choice1}} ||| {{choice2}}'
        id: 0edd8660-f299-4819-a5ac-633c11177228
        jinja: 'Exercise: choose the most plausible alternative.


          {{ premise }} {% if question == "cause" %} because... {% else %} so... {% endif
          %}

          - {{choice1}}

          - {{choice2}} ||| {{ answer_choices[label] }}'
        metadata: !TemplateMetadata
          choices_in_prompt: true
          languages:
          - en
          metrics:
          - Accuracy
          original_task: true
        name: exercise
        reference: ''
      3a2a9d1a-7f8e-4b0a-9d2c-000000000001: !Template
        answer_choices: Yes ||| No
        id: 3a2a9d1a-7f8e-4b0a-9d2c-000000000001
        jinja: '{{ premise }} Is "{{ choice1 }}" the {{ question }}? ||| {% if label == 0 %}{{ answer_choices[0] }}{% else %}{{ answer_choices[1] }}{% endif %}'
        metadata: !TemplateMetadata
          choices_in_prompt: false
          languages:
          - en
          metrics:
          - Accuracy
          original_task: false
        name: is it the cause
        reference: test
    """)

EXAMPLE = {"premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.",
           "choice2": "He got a hole in his sock.", "question": "cause", "label": 0, "idx": 3}

TEMPLATE_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "ia3_jax", "tasks", "templates")


@pytest.fixture(scope="module")
def copa_set(tmp_path_factory):
  path = tmp_path_factory.mktemp("ps") / "templates.yaml"
  path.write_text(PROMPTSOURCE_YAML)
  return tpl.load_templates(path)


def test_promptsource_yaml_parses(copa_set):
  assert (copa_set.dataset, copa_set.subset) == ("super_glue", "copa")
  first, second = copa_set.templates
  assert first.name == "exercise" and first.id == "0edd8660-f299-4819-a5ac-633c11177228"
  assert first.original_task is True and first.choices_in_prompt is True
  assert first.metrics == ("Accuracy",) and first.languages == ("en",)
  assert second.original_task is False and second.reference == "test"
  assert first.line == 4 and second.line == 25  # lines of the !Template nodes
  assert [t.name for t in copa_set.filter(original_task_only=True)] == ["exercise"]


def test_renders_as_promptsource(copa_set):
  first, second = copa_set.templates
  r = first.render(EXAMPLE)
  # promptsource: render, split on |||, strip each part; choices rendered and split likewise.
  assert r.inputs == ("Exercise: choose the most plausible alternative.\n\n"
                      "The man broke his toe.  because... \n"
                      "- He dropped a hammer on his foot.\n"
                      "- He got a hole in his sock.")
  assert r.target == "He dropped a hammer on his foot."
  assert r.choices == ("He dropped a hammer on his foot.", "He got a hole in his sock.")
  assert r.label == 0
  r2 = second.render(dict(EXAMPLE, label=1, question="effect"))
  assert r2.inputs == 'The man broke his toe. Is "He dropped a hammer on his foot." the effect?'
  assert (r2.target, r2.choices, r2.label) == ("No", ("Yes", "No"), 1)


def test_pipes_inside_fields_survive(copa_set):
  ex = dict(EXAMPLE, premise="a ||| b", choice2="x ||| y", label=1)
  r = copa_set.templates[0].render(ex)
  assert "a ||| b" in r.inputs and r.choices[1] == "x ||| y" and r.target == "x ||| y"


def test_untagged_list_and_old_list_choices():
  text = textwrap.dedent("""\
      dataset: mine
      templates:
        - name: plain
          jinja: "Review: {{text}} Good? ||| {{answer_choices[label]}}"
          answer_choices: [ 'no', 'yes' ]
          metadata: {original_task: true}
      """)
  s = tpl.parse_templates(text, "mine.yaml")
  r = s.templates[0].render({"text": "great", "label": 1})
  assert (r.inputs, r.target, r.choices, r.label) == ("Review: great Good?", "yes", ("no", "yes"), 1)
  assert s.templates[0].fixed_answer_choices() == ("no", "yes")


def test_our_template_files_load_through_the_same_path():
  files = sorted(glob.glob(os.path.join(TEMPLATE_DIR, "*.yaml")))
  assert len(files) == 9 + 11 + 6
  for path in files:
    s = tpl.load_templates(path)
    assert len(s) >= 1 and all(t.answer_choices or "gigaword" in path for t in s)
    if not os.path.basename(path).startswith(("raft_", "mrpc", "paws", "imdb", "ag_news", "cosmos", "gigaword")):
      assert len(s.filter(original_task_only=True)) >= 4, path  # several per T0 dataset


def test_promptsource_checkout_lookup(tmp_path):
  folder = tmp_path / "promptsource" / "templates" / "super_glue" / "copa"
  folder.mkdir(parents=True)
  (folder / "templates.yaml").write_text(PROMPTSOURCE_YAML)
  s = tpl.promptsource_templates(tmp_path, "super_glue", "copa")
  assert [t.name for t in s] == ["exercise", "is it the cause"]
  with pytest.raises(DataError, match="no promptsource templates for dataset 'super_glue' subset 'rte'"):
    tpl.promptsource_templates(tmp_path, "super_glue", "rte")


def test_rendering_is_sandboxed():
  t = tpl.Template(name="evil", jinja="{{ ''.__class__.__mro__[1].__subclasses__() }} ||| x")
  with pytest.raises(DataError, match="evil.*SecurityError"):
    t.render({})


def test_each_template_source_is_compiled_once(monkeypatch):
  """Rendering many examples compiles the template's Jinja (and its answer choices) once, in
  the sandbox; the renders are those of a fresh compilation."""
  import jinja2.sandbox
  compiled, real = [], jinja2.sandbox.SandboxedEnvironment.from_string
  monkeypatch.setattr(jinja2.sandbox.SandboxedEnvironment, "from_string",
                      lambda self, source, *a, **k: compiled.append(source) or real(self, source,
                                                                                   *a, **k))
  t = tpl.Template(name="once", jinja="{{ x }} {{ 7 * 6 }} ||| {{ answer_choices[label] }}",
                   answer_choices="{{ a }} ||| {{ b }} ||| {{ x }}")
  rows = [t.render({"x": f"row {i}", "a": "A", "b": "B", "label": i % 3}) for i in range(20)]
  assert sorted(compiled) == sorted([t.jinja, t.answer_choices])
  assert [r.inputs for r in rows] == [f"row {i} 42" for i in range(20)]
  assert [r.target for r in rows] == [("A", "B", f"row {i}")[i % 3] for i in range(20)]


def test_choice_filter_is_seeded_per_example():
  t = tpl.Template(name="pick", jinja="{{ options | choice }} ||| {{ options | choice }}")
  ex = {"options": [str(i) for i in range(50)]}
  assert t.render(ex) == t.render(dict(ex))
  picks = {t.render({"options": ex["options"], "k": k}).inputs for k in range(20)}
  assert len(picks) > 1


def _one(jinja, answer_choices="Yes ||| No"):
  return tpl.parse_templates(
      "dataset: d\ntemplates:\n  - name: t1\n    answer_choices: " + answer_choices +
      "\n    jinja: '" + jinja + "'\n", "bad.yaml").templates[0]


def test_error_missing_field_names_everything():
  t = _one("{{ premise }} {{ hypothesis }} ||| {{ answer_choices[label] }}")
  with pytest.raises(DataError) as e:
    t.render({"premise": "p", "label": 0}, where="data.jsonl, line 7")
  msg = str(e.value)
  for part in ("data.jsonl, line 7", "template 't1'", "bad.yaml:3", "missing field 'hypothesis'"):
    assert part in msg, msg


@pytest.mark.parametrize("label", [2, -1])
def test_error_label_outside_choices(label):
  t = _one("{{ premise }} ||| {{ answer_choices[label] }}")
  with pytest.raises(DataError, match=r"label outside the choices.*field 'label' = " + str(label)):
    t.render({"premise": "p", "label": label}, where="x.jsonl, line 2")


def test_error_target_not_a_choice():
  t = _one("{{ premise }} ||| {{ gold }}", "negative ||| positive")
  with pytest.raises(DataError, match=r"x.jsonl, line 2: template 't1' \(bad.yaml:3\): label outside the "
                                      r"choices: target 'neutral'.*field 'gold' = 'neutral'"):
    t.render({"premise": "p", "gold": "neutral"}, where="x.jsonl, line 2")


def test_error_empty_input_and_target():
  t = _one("{{ premise }} ||| {{ answer_choices[label] }}")
  with pytest.raises(DataError, match=r"line 4: template 't1' \(bad.yaml:3\): renders an empty input "
                                      r"\(field 'premise' = '  '\)"):
    t.render({"premise": "  ", "label": 0}, where="line 4")
  g = _one("{{ premise }} ||| {{ summary }}", "null")
  with pytest.raises(DataError, match="renders an empty target"):
    g.render({"premise": "p", "summary": ""})


def test_unlabeled_renders_input_only():
  t = _one("{{ premise }} ||| {{ answer_choices[label] }}")
  r = t.render({"premise": "p", "label": -1}, labeled=False)
  assert (r.inputs, r.target, r.label, r.choices) == ("p", "", -1, ("Yes", "No"))


def test_load_errors_name_file_and_line(tmp_path):
  with pytest.raises(DataError, match=r"template 'no sep' \(bad.yaml:3\): field 'jinja' must be a string with '\|\|\|'"):
    tpl.parse_templates("dataset: d\ntemplates:\n  - name: no sep\n    jinja: 'just input'\n", "bad.yaml")
  with pytest.raises(DataError, match=r"template 'broken' \(bad.yaml:3\): field 'jinja': Jinja syntax"):
    tpl.parse_templates("dataset: d\ntemplates:\n  - name: broken\n    jinja: '{{ x ||| y'\n", "bad.yaml")
  with pytest.raises(DataError, match="bad.yaml:4: template name 'a' is not unique"):
    tpl.parse_templates("templates:\n  - {name: a, jinja: 'x ||| y'}\n\n  - {name: a, jinja: 'x ||| z'}\n",
                        "bad.yaml")
  with pytest.raises(DataError, match="cannot read template file"):
    tpl.load_templates(tmp_path / "missing.yaml")
  # Unknown YAML tags are refused by the safe loader (no arbitrary Python objects).
  with pytest.raises(DataError, match="not valid YAML"):
    tpl.parse_templates("templates: !!python/object/apply:os.system ['true']\n", "evil.yaml")
