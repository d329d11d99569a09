"""Prompt templates: promptsource-format YAML rendered in a sandboxed Jinja2 environment.

A template file is promptsource's `templates.yaml` format, read as it is:

```yaml
dataset: super_glue
subset: rte
templates:
  <uuid>: !Template
    id: <uuid>
    name: does it follow
    jinja: '{{premise}} Does it follow that "{{hypothesis}}"? ||| {{ answer_choices[label] }}'
    answer_choices: Yes ||| No
    metadata: !TemplateMetadata {original_task: true, choices_in_prompt: false,
                                 metrics: [Accuracy], languages: [en]}
    reference: ''
```

`jinja` renders to `input ||| target`; `answer_choices` is itself a Jinja
expression rendering to choices separated by `|||` (older promptsource files
give a plain list; both are accepted). The `!Template` / `!TemplateMetadata`
tags are parsed by a safe loader; untagged mappings and a list under
`templates:` are accepted too, so hand-written files need no tags.

Rendering follows promptsource: `|||` inside example strings is protected
before rendering and restored after splitting, parts are stripped, the list of
answer choices is visible to the template as `answer_choices`. Differences, on
purpose: rendering is sandboxed (`jinja2.sandbox.SandboxedEnvironment`),
undefined fields raise instead of rendering as empty text, a `{{ ... }}` whose value is
null, a boolean, a list or a dict raises instead of printing "None", "True" or a
Python repr (format such fields in the template), a boolean label is not a choice
index (JSON `true` is not label 1), example fields are
not cut to 2048 characters (long inputs are cut in tokens later, and counted),
and the `choice` filter is seeded by the example so renders are reproducible.
Every problem raises `DataError` naming where the example came from, the
template and its file and line, and the fields involved.
"""

from __future__ import annotations

from ia3_jax.errors import DataError, EmptyRenderError  # re-exported: ia3_jax.errors is its home

import dataclasses
import functools
import hashlib
import os
import random
import re
from collections import Counter
from typing import Any, Iterable, Mapping

import jinja2
import jinja2.meta
import jinja2.sandbox
import yaml

SEPARATOR = "|||"
_PIPE_GUARD = "\x00PIPE\x00"
_MAX_SHOWN = 80  # characters of a field value shown in an error message




def _most_frequent(items):
  if not items:
    return None
  counts = Counter(items).most_common()
  top = counts[0][1]
  return [item for item, count in counts if count == top]


@jinja2.pass_context
def _choice(context, items):
  """promptsource's `choice` filter, seeded per example (see Template._render)."""
  return context["__rng__"].choice(list(items))


class CoercionError(TypeError):
  """A `{{ ... }}` expression whose value has no faithful text (see `_as_text`)."""


def _as_text(value: Any) -> Any:
  """Jinja's `finalize`: refuses to print None, booleans, lists and dicts, which Jinja would
  turn into "None", "True" or a Python repr (a null field, a JSON `true`, a list field
  rendered whole); numbers and strings print as usual. Format them in the template instead
  (`{{ x | join(", ") }}`, `{{ "yes" if flag else "no" }}`)."""
  if value is None or isinstance(value, (bool, list, tuple, dict)):
    kind = "a null value" if value is None else f"a {type(value).__name__}"
    raise CoercionError(f"renders {kind} ({_shown(value)}) as text; give the field a string "
                        "or format it in the template (e.g. | join(', '))")
  return value


def _make_env() -> jinja2.sandbox.SandboxedEnvironment:
  env = jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined, finalize=_as_text)
  env.globals["zip"] = zip
  env.filters["choice"] = _choice
  env.filters["most_frequent"] = _most_frequent
  env.filters["highlight"] = lambda text: text  # promptsource UI markup: a no-op here
  return env


_ENV = _make_env()


@functools.lru_cache(maxsize=4096)
def _compiled(source: str) -> jinja2.Template:
  """The sandboxed template of `source`, compiled once (`from_string` compiles on every call:
  most of a render's time)."""
  return _ENV.from_string(source)


def _shown(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."


def _protect(value: Any) -> Any:
  """Hides `|||` inside example strings (also inside lists) from the split."""
  if isinstance(value, str):
    return value.replace(SEPARATOR, _PIPE_GUARD)
  if isinstance(value, (list, tuple)):
    return type(value)(_protect(v) for v in value)
  return value


class _ChoiceList(list):
  """The `answer_choices` seen by a template: a negative or boolean index is out of range.

  Plain lists would map label -1 (unlabelled in TFDS) to the last choice, and True to 1.
  """

  def __getitem__(self, index):
    if isinstance(index, bool) or isinstance(index, int) and index < 0:
      raise IndexError(index)
    return super().__getitem__(index)


def _restore(text: str) -> str:
  return text.replace(_PIPE_GUARD, SEPARATOR)


@dataclasses.dataclass(frozen=True)
class Rendered:
  """One example through one template.

  `label` is the index of `target` in `choices`; -1 when the example is
  unlabelled (then `target` is empty).
  """
  inputs: str
  target: str
  choices: tuple[str, ...] | None
  label: int


@dataclasses.dataclass(frozen=True)
class Template:
  """A promptsource-style prompt template."""

  name: str
  jinja: str
  answer_choices: str | None = None
  id: str = ""
  original_task: bool | None = None
  choices_in_prompt: bool | None = None
  metrics: tuple[str, ...] = ()
  languages: tuple[str, ...] = ()
  reference: str = ""
  file: str = "<string>"
  line: int = 0

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name.strip():
      raise DataError(f"{self.file}:{self.line}: template without a name")
    if not isinstance(self.jinja, str) or SEPARATOR not in self.jinja:
      raise DataError(f"{self.location}: field 'jinja' must be a string with '{SEPARATOR}' "
                      "between input and target")
    for field, text in (("jinja", self.jinja), ("answer_choices", self.answer_choices)):
      if text is None:
        continue
      try:
        _ENV.parse(text)
      except jinja2.TemplateSyntaxError as e:
        raise DataError(f"{self.location}: field {field!r}: Jinja syntax error on line "
                        f"{e.lineno} of the field: {e.message}") from None

  @property
  def location(self) -> str:
    return f"template {self.name!r} ({self.file}:{self.line})"

  @property
  def slug(self) -> str:
    """The name as a seqio-safe identifier."""
    return re.sub(r"[^a-z0-9]+", "_", self.name.lower()).strip("_") or "template"

  def fixed_answer_choices(self) -> tuple[str, ...] | None:
    """The choices when they do not depend on the example, else None."""
    if self.answer_choices is None or _fields_used(self.answer_choices):
      return None
    return tuple(c.strip() for c in _compiled(self.answer_choices).render().split(SEPARATOR))

  def render(self, example: Mapping[str, Any], *, where: str = "example",
             labeled: bool = True) -> Rendered:
    """Renders `example`; raises DataError on any problem.

    Args:
      example: the example's fields.
      where: where the example comes from (file and line, or dataset and
        index), used in error messages.
      labeled: False for unlabelled examples: only the part before `|||` is
        rendered (it must be at the top level of the template) and label is -1.
    """
    if "answer_choices" in example:
      raise DataError(f"{where}: {self.location}: field 'answer_choices' is reserved for the "
                      "template's answer choices; rename it in the data")
    fields = {k: _protect(v) for k, v in example.items()}
    choices = self._render_choices(fields, example, where)
    source = self.jinja if labeled else self.jinja.split(SEPARATOR, 1)[0]
    protected = _ChoiceList(_protect(c) for c in choices) if choices else None
    text = self._render(source, dict(fields, answer_choices=protected),
                        example, where, "jinja")
    parts = [_restore(p).strip() for p in text.split(SEPARATOR)]
    if len(parts) > 2:
      raise DataError(f"{where}: {self.location}: renders {len(parts) - 1} '{SEPARATOR}' "
                      "separators; expected exactly one (input ||| target)")
    inputs = parts[0]
    if not inputs:
      raise EmptyRenderError(f"{where}: {self.location}: renders an empty input"
                      f"{self._fields_note(source.split(SEPARATOR, 1)[0], example)}")
    if not labeled:
      return Rendered(inputs, "", choices, -1)
    target = parts[1] if len(parts) == 2 else ""
    target_src = self.jinja.split(SEPARATOR, 1)[1]
    if not target:
      raise EmptyRenderError(f"{where}: {self.location}: renders an empty target"
                      f"{self._fields_note(target_src, example)}")
    label = -1
    if choices is not None:
      if target not in choices:
        raise DataError(f"{where}: {self.location}: label outside the choices: target "
                        f"{_shown(target)} is not one of {list(choices)}"
                        f"{self._fields_note(target_src, example)}")
      label = choices.index(target)
    return Rendered(inputs, target, choices, label)

  def _render_choices(self, fields, example, where) -> tuple[str, ...] | None:
    if self.answer_choices is None:
      return None
    text = self._render(self.answer_choices, fields, example, where, "answer_choices")
    choices = tuple(_restore(c).strip() for c in text.split(SEPARATOR))
    if not choices or any(not c for c in choices):
      raise DataError(f"{where}: {self.location}: field 'answer_choices' renders an empty "
                      f"choice: {list(choices)}{self._fields_note(self.answer_choices, example)}")
    return choices

  def _render(self, source: str, fields: dict, example, where: str, part: str) -> str:
    env_fields = dict(fields)
    env_fields.setdefault("answer_choices", None)
    try:
      template = _compiled(source)
      rng = random.Random(_stable_seed(self.id or self.name, example))
      return template.render(**env_fields, __rng__=rng)
    except jinja2.UndefinedError as e:
      missing = _missing_field(e.message, example)
      what = f"missing field {missing!r}" if missing else e.message
      if "has no element" in (e.message or ""):
        what = f"label outside the choices ({e.message})"
        if re.search(r"has no element (True|False)$", e.message or ""):
          what = ("a boolean label is not the index of an answer choice (JSON true/false: "
                  "give the label as 0, 1, ...)")
      raise DataError(f"{where}: {self.location}: field {part!r}: {what}; the example has "
                      f"fields {sorted(example)}{self._fields_note(source, example)}") from None
    except jinja2.TemplateError as e:
      raise DataError(f"{where}: {self.location}: field {part!r}: {type(e).__name__}: "
                      f"{e}{self._fields_note(source, example)}") from None
    except CoercionError as e:
      raise DataError(f"{where}: {self.location}: field {part!r}: {e}"
                      f"{self._fields_note(source, example)}") from None
    except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError) as e:
      raise DataError(f"{where}: {self.location}: field {part!r}: {type(e).__name__}: "
                      f"{e}{self._fields_note(source, example)}") from None

  def _fields_note(self, source: str, example: Mapping[str, Any]) -> str:
    used = sorted(f for f in _fields_used(source) if f != "answer_choices")
    if not used:
      return ""
    shown = ", ".join(f"field {f!r} = {_shown(example[f])}" if f in example
                      else f"field {f!r} missing" for f in used)
    return f" ({shown})"


def _fields_used(source: str) -> set[str]:
  try:
    return set(jinja2.meta.find_undeclared_variables(_ENV.parse(source))) - {"zip"}
  except jinja2.TemplateSyntaxError:
    return set()


def _missing_field(message: str | None, example: Mapping[str, Any]) -> str | None:
  match = re.match(r"'([^']+)' is undefined", message or "")
  if match and match.group(1) not in example:
    return match.group(1)
  return None


def _stable_seed(key: str, example: Mapping[str, Any]) -> int:
  digest = hashlib.sha256((key + repr(sorted(example.items(), key=lambda kv: kv[0]))).encode())
  return int.from_bytes(digest.digest()[:8], "little")


@dataclasses.dataclass(frozen=True)
class TemplateSet:
  """The templates of one dataset, in file order."""
  dataset: str
  subset: str | None
  templates: tuple[Template, ...]
  file: str

  def __len__(self) -> int:
    return len(self.templates)

  def __iter__(self):
    return iter(self.templates)

  def get(self, name: str) -> Template:
    for t in self.templates:
      if t.name == name or t.slug == name:
        return t
    raise DataError(f"{self.file}: no template named {name!r}; templates: "
                    f"{[t.name for t in self.templates]}")

  def filter(self, *, original_task_only: bool = False, with_choices: bool = False,
             names: Iterable[str] | None = None) -> "TemplateSet":
    """A subset: original-task templates, ones with answer choices, or named ones."""
    kept = list(self.templates)
    if names is not None:
      kept = [self.get(n) for n in names]
    if original_task_only:
      kept = [t for t in kept if t.original_task]
    if with_choices:
      kept = [t for t in kept if t.answer_choices is not None]
    if not kept:
      raise DataError(f"{self.file}: no template left after filtering "
                      f"(original_task_only={original_task_only}, with_choices={with_choices})")
    return dataclasses.replace(self, templates=tuple(kept))


class _Loader(yaml.SafeLoader):
  """Safe YAML loader that knows promptsource's tags and records line numbers."""

  def construct_mapping(self, node, deep=False):
    mapping = super().construct_mapping(node, deep=deep)
    mapping["__line__"] = node.start_mark.line + 1
    return mapping


def _tagged_mapping(loader: _Loader, node):
  return loader.construct_mapping(node, deep=True)


_Loader.add_constructor("!Template", _tagged_mapping)
_Loader.add_constructor("!TemplateMetadata", _tagged_mapping)


def _as_tuple(value, file, line, field) -> tuple[str, ...]:
  if value is None:
    return ()
  if isinstance(value, str):
    return (value,)
  if isinstance(value, (list, tuple)):
    return tuple(str(v) for v in value)
  raise DataError(f"{file}:{line}: field {field!r} must be a list, got {_shown(value)}")


def _choices_expr(value, file, line, name) -> str | None:
  if value is None:
    return None
  if isinstance(value, (list, tuple)):  # older promptsource files
    return f" {SEPARATOR} ".join(str(v) for v in value)
  if isinstance(value, str):
    return value
  raise DataError(f"{file}:{line}: template {name!r}: field 'answer_choices' must be a string "
                  f"or a list, got {_shown(value)}")


def _template_from_mapping(entry: Mapping[str, Any], key: str | None, file: str) -> Template:
  line = entry.get("__line__", 0)
  for field in ("name", "jinja"):
    if not isinstance(entry.get(field), str):
      raise DataError(f"{file}:{line}: template {entry.get('name', key)!r}: missing or "
                      f"non-string field {field!r}")
  meta = entry.get("metadata") or {}
  if not isinstance(meta, Mapping):
    raise DataError(f"{file}:{line}: template {entry['name']!r}: field 'metadata' must be a mapping")
  return Template(
      name=entry["name"],
      jinja=entry["jinja"],
      answer_choices=_choices_expr(entry.get("answer_choices"), file, line, entry["name"]),
      id=str(entry.get("id") or key or ""),
      original_task=meta.get("original_task"),
      choices_in_prompt=meta.get("choices_in_prompt"),
      metrics=_as_tuple(meta.get("metrics"), file, line, "metadata.metrics"),
      languages=_as_tuple(meta.get("languages"), file, line, "metadata.languages"),
      reference=str(entry.get("reference") or ""),
      file=file,
      line=line)


def parse_templates(text: str, file: str = "<string>") -> TemplateSet:
  """Parses the text of a promptsource-format template file."""
  try:
    doc = yaml.load(text, Loader=_Loader)  # noqa: S506 -- _Loader is a SafeLoader subclass
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    where = f"{file}:{mark.line + 1}" if mark else file
    raise DataError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
  if not isinstance(doc, Mapping) or "templates" not in doc:
    raise DataError(f"{file}: expected a mapping with a 'templates' field")
  raw = doc["templates"]
  if isinstance(raw, Mapping):
    entries = [(str(k), v) for k, v in raw.items() if k != "__line__"]
  elif isinstance(raw, list):
    entries = [(None, v) for v in raw]
  else:
    raise DataError(f"{file}:{doc.get('__line__', 1)}: field 'templates' must be a mapping or a list")
  templates = []
  for key, entry in entries:
    if not isinstance(entry, Mapping):
      raise DataError(f"{file}: template {key!r} must be a mapping, got {_shown(entry)}")
    templates.append(_template_from_mapping(entry, key, file))
  if not templates:
    raise DataError(f"{file}: no templates")
  seen: dict[str, Template] = {}
  for t in templates:
    if t.slug in seen:
      raise DataError(f"{file}:{t.line}: template name {t.name!r} is not unique in the file "
                      f"(see line {seen[t.slug].line})")
    seen[t.slug] = t
  subset = doc.get("subset")
  return TemplateSet(dataset=str(doc.get("dataset", "")), subset=None if subset is None else str(subset),
                     templates=tuple(templates), file=file)


def load_templates(path: str | os.PathLike) -> TemplateSet:
  """Loads a template file (promptsource `templates.yaml` or one of ours)."""
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except OSError as e:
    raise DataError(f"{path}: cannot read template file: {e.strerror}") from None
  return parse_templates(text, file=path)


def promptsource_templates(checkout: str | os.PathLike, dataset: str,
                           subset: str | None = None) -> TemplateSet:
  """Loads `templates.yaml` of `dataset`/`subset` from a promptsource checkout.

  `checkout` may be the repository root or its `promptsource/templates` folder.
  """
  root = os.fspath(checkout)
  for base in (os.path.join(root, "promptsource", "templates"), root):
    path = os.path.join(base, dataset, *([subset] if subset else []), "templates.yaml")
    if os.path.exists(path):
      return load_templates(path)
  raise DataError(f"{root}: no promptsource templates for dataset {dataset!r} subset {subset!r} "
                  f"(looked for {os.path.join('promptsource/templates', dataset, subset or '', 'templates.yaml')})")
