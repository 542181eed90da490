"""Load and write samples: our JSONL and the original ViGoRL project's three data schemas.

`load_samples(path)` detects the schema of a file from its first record and requires every record to match:
- ours: `Sample.model_dump_json()` lines (key `schema_version`);
- A, vlmsearch (MCTS/eval) JSONL: {id, image, conversations: [{from: human, value}, {from: gpt, value}]};
- B, RL JSONL (EasyR1): {problem (with "<image>" placeholders), answer, images};
- C, SFT sharegpt: JSON array, JSONL or parquet of {messages: [{role, content}], images, id?, gt_answer?,
  metadata?} (what `vigorl chains` writes; docs/method.md "Data of the original release").
Relative image paths resolve against `data_root` (default: the file's folder); returned samples hold
absolute paths. Bad input raises `DataError` naming file, line and field; nothing is skipped silently.
The writers produce ours (`write_samples_jsonl`) and A/B records (`to_vlmsearch_record`, `to_rl_record`)
so data can go back to the original tools.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ValidationError

from vigorl_core.records import SCHEMA_VERSION, TASKS, Sample
from vigorl_core.sample_fields import BOX_RE, POINT_RE, infer_task_source, parse_options, path_category

IMAGE_TOKEN = "<image>"
_MAX_LISTED_MISSING = 10


class DataError(ValueError):
    """A bad data file or record. `line` is 1-based (None for whole-file problems): the line in JSONL,
    the line where the element starts in a JSON array, the row number in parquet."""

    def __init__(self, file: str | os.PathLike, line: int | None, field: str | None, reason: str):
        self.file, self.line, self.field, self.reason = str(file), line, field, reason
        where = f"{self.file}:{line}" if line is not None else self.file
        super().__init__(f"{where}: field '{field}': {reason}" if field else f"{where}: {reason}")


# ----------------------------------------------------------------------------------------------- reading

def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-empty line; bad JSON or a non-object raises DataError."""
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(path, lineno, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(path, lineno, None, f"expected a JSON object, got {_type_name(obj)}")
            yield lineno, obj


_BETWEEN_ELEMENTS = re.compile(r"[\s,]*")


def _read_json_array(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
    # Walk the text again to know the line each element starts on, for error messages.
    decoder, line, counted, idx = json.JSONDecoder(), 1, 0, text.index("[") + 1
    for obj in items:
        idx = _BETWEEN_ELEMENTS.match(text, idx).end()
        line, counted = line + text.count("\n", counted, idx), idx
        if not isinstance(obj, dict):
            raise DataError(path, line, None, f"expected a JSON object, got {_type_name(obj)}")
        yield line, obj
        idx = decoder.raw_decode(text, idx)[1]


def read_records(path: Path) -> Iterator[tuple[int, int, dict]]:
    """(line, record number, record) for JSONL, a JSON array or parquet rows."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # lazy: only SFT parquet files need it

        rows = pq.read_table(path).to_pylist()
        yield from ((i, i, row) for i, row in enumerate(rows, start=1))
        return
    if path.suffix == ".json":
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            yield from ((line, n, obj) for n, (line, obj) in enumerate(_read_json_array(path, text), start=1))
            return
    yield from ((line, line, obj) for line, obj in read_jsonl(path))


# ------------------------------------------------------------------------------------------ field checks

_JSON_TYPE = {str: "a string", list: "a list", dict: "an object", int: "an integer"}


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class RecordLocation:
    """The record being parsed: builds DataErrors and checks field types."""

    def __init__(self, file: Path, line: int):
        self.file, self.line = file, line

    def error(self, field: str | None, reason: str) -> DataError:
        return DataError(self.file, self.line, field, reason)

    def get(self, obj: dict, key: str, typ: type, prefix: str = "", optional: bool = False) -> Any:
        field = f"{prefix}.{key}" if prefix else key
        value = obj.get(key)
        if value is None:  # parquet fills absent optional columns with None
            if optional:
                return None
            raise self.error(field, "missing")
        if not isinstance(value, typ) or isinstance(value, bool):
            raise self.error(field, f"expected {_JSON_TYPE[typ]}, got {_type_name(value)}")
        return value

    def strings(self, obj: dict, key: str) -> list[str]:
        values = self.get(obj, key, list)
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise self.error(f"{key}[{i}]", f"expected a string, got {_type_name(v)}")
        return values


# ---------------------------------------------------------------------------------- schema A / B / C

_SCHEMAS = {"schema_version": "ours", "conversations": "vlmsearch", "problem": "rl", "messages": "sft"}
_SCHEMA_HELP = ("expected ours (schema_version, ...), vlmsearch (id, image, conversations), "
                "RL (problem, answer, images) or SFT sharegpt (messages, images)")
_KEYS = {"vlmsearch": {"id", "image", "conversations"}, "rl": {"id", "problem", "answer", "images"},
         "sft": {"id", "messages", "images", "gt_answer", "metadata"}}


def _parse_vlmsearch(rec: dict, at: RecordLocation) -> dict:
    id_ = record_id(rec, at, required=True)
    image = at.get(rec, "image", str)
    conv = at.get(rec, "conversations", list)
    if len(conv) < 2:
        raise at.error("conversations", f"expected a human turn and a gpt turn, got {len(conv)} entries")
    values = []
    for i, role in enumerate(("human", "gpt")):
        if not isinstance(conv[i], dict):
            raise at.error(f"conversations[{i}]", f"expected an object, got {_type_name(conv[i])}")
        if (got := at.get(conv[i], "from", str, f"conversations[{i}]")) != role:
            raise at.error(f"conversations[{i}].from", f"expected '{role}', got '{got}'")
        values.append(at.get(conv[i], "value", str, f"conversations[{i}]"))
    return dict(id=id_, images=[image], question=values[0], answer=values[1],
                answer_field="conversations[1].value", metadata={})


def _parse_rl(rec: dict, at: RecordLocation) -> dict:
    problem, answer, images = at.get(rec, "problem", str), at.get(rec, "answer", str), at.strings(rec, "images")
    n = problem.count(IMAGE_TOKEN)
    if n and n != len(images):
        raise at.error("images", f"problem has {n} {IMAGE_TOKEN} placeholders but {len(images)} images")
    return dict(id=record_id(rec, at), images=images, question=problem, answer=answer,
                answer_field="answer", metadata={})


_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _parse_sft(rec: dict, at: RecordLocation) -> dict:
    messages, images = at.get(rec, "messages", list), at.strings(rec, "images")
    question = system = last_assistant = None
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise at.error(f"messages[{i}]", f"expected an object, got {_type_name(m)}")
        role, content = at.get(m, "role", str, f"messages[{i}]"), at.get(m, "content", str, f"messages[{i}]")
        if role == "user" and question is None:
            question = content
        elif role == "system" and system is None:
            system = content
        elif role == "assistant":
            last_assistant = (i, content)
    if question is None:
        raise at.error("messages", "no message with role 'user'")
    answer = at.get(rec, "gt_answer", str, optional=True)
    answer_field = "gt_answer"
    if answer is None:
        found = _ANSWER_RE.findall(last_assistant[1]) if last_assistant else []
        if not found:
            raise at.error("gt_answer", "missing, and no assistant message holds <answer>...</answer>")
        answer, answer_field = found[-1].strip(), f"messages[{last_assistant[0]}].content"
    # Multi-turn chains also list their crop observations; the sample keeps only the question's images.
    n = question.count(IMAGE_TOKEN) or len(images)
    if n > len(images):
        raise at.error("images", f"the question has {n} {IMAGE_TOKEN} placeholders but {len(images)} images")
    metadata = dict(at.get(rec, "metadata", dict, optional=True) or {})
    if system is not None:
        metadata["system"] = system
    return dict(id=record_id(rec, at), images=images[:n], question=question, answer=answer,
                answer_field=answer_field, metadata=metadata)


def record_id(rec: dict, at: RecordLocation, required: bool = False) -> str | None:
    id_ = rec.get("id")
    if id_ is None and required:
        raise at.error("id", "missing")
    if id_ is not None and (not isinstance(id_, (str, int)) or isinstance(id_, bool)):
        raise at.error("id", f"expected a string or an integer, got {_type_name(id_)}")
    return None if id_ is None else str(id_)


_PARSERS = {"vlmsearch": _parse_vlmsearch, "rl": _parse_rl, "sft": _parse_sft}

# ----------------------------------------------------------------------------------------------- loading

def load_samples(path: str | os.PathLike, *, data_root: str | os.PathLike | None = None,
                 task: str | None = None, source: str | None = None, check_images: bool = True) -> list[Sample]:
    """Load one file in any supported schema as Samples with absolute image paths.

    `task`/`source` are needed for schemas A/B/C when the path does not name them (see `infer_task_source`);
    given ones win over inferred ones. Our own records carry theirs; a given one that differs is an error.
    With `check_images`, every missing image file is collected and reported in one DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "file not found")
    root = Path(data_root) if data_root is not None else path.parent
    if task is not None and task not in TASKS:
        raise DataError(path, None, "task", f"expected one of {', '.join(TASKS)}, got '{task}'")
    given = (task, source)
    inferred_task, inferred_source = infer_task_source(path)
    task, source = task or inferred_task, source or inferred_source

    samples: list[Sample] = []
    schema, key, first_line, seen, missing = None, "", 0, {}, []
    for line, number, rec in read_records(path):
        at = RecordLocation(path, line)
        if schema is None:
            schema = next((s for key, s in _SCHEMAS.items() if key in rec), None)
            if schema is None:
                raise at.error(None, f"unknown schema with keys {sorted(rec)}; {_SCHEMA_HELP}")
            if schema != "ours" and (task is None or source is None):
                raise at.error("task" if task is None else "source", f"cannot infer it from the path; pass "
                               f"task= and source= to load_samples (task one of {', '.join(TASKS)})")
            first_line = line
            key = next(k for k, s in _SCHEMAS.items() if s == schema)
        if key not in rec:
            raise at.error(key, f"missing; the file's first record (line {first_line}) is in schema {schema}")
        sample = _load_ours(rec, at, *given) if schema == "ours" else \
            _build_sample(schema, rec, at, task, source, f"{path.stem}:{number}")
        sample.images = [absolute_path(p, root) for p in sample.images]
        if sample.id in seen:
            raise at.error("id", f"duplicate id '{sample.id}', first on line {seen[sample.id]}")
        seen[sample.id] = line
        if check_images:
            missing += [(line, p) for p in sample.images if not os.path.isfile(p)]
        samples.append(sample)
    if missing:
        listed = "\n".join(f"  {path}:{line}: {p}" for line, p in missing[:_MAX_LISTED_MISSING])
        extra = len(missing) - _MAX_LISTED_MISSING
        more = f"\n  ... and {extra} more" if extra > 0 else ""
        raise DataError(path, None, "images", f"{len(missing)} image file(s) not found (data root {root}; "
                        f"pass data_root= or check_images=False):\n{listed}{more}")
    return samples


def _load_ours(rec: dict, at: RecordLocation, task: str | None, source: str | None) -> Sample:
    version = rec.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise at.error("schema_version", f"expected an integer <= {SCHEMA_VERSION}, got {version!r}")
    try:
        sample = Sample.model_validate(rec)
    except ValidationError as e:
        err, n = e.errors()[0], e.error_count()
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        reason = err["msg"]
        if err["type"].endswith("_type"):
            reason += f", got {_type_name(err['input'])}"
        elif err["type"] not in ("missing", "extra_forbidden"):
            reason += f", got {str(err['input'])[:80]!r}"
        raise at.error(field or None, reason + (f" (and {n - 1} more errors)" if n > 1 else "")) from None
    for name, given in (("task", task), ("source", source)):
        if given is not None and getattr(sample, name) != given:
            raise at.error(name, f"record says '{getattr(sample, name)}' but load_samples got {name}='{given}'")
    return sample


def _build_sample(schema: str, rec: dict, at: RecordLocation, task: str, source: str, default_id: str) -> Sample:
    fields = _PARSERS[schema](rec, at)
    question = fields["question"].replace(IMAGE_TOKEN, "").strip()
    answer, bbox, point = fields["answer"], None, None
    if task == "grounding":
        if m := BOX_RE.match(answer):
            bbox = tuple(float(v) for v in m.groups())
        elif m := POINT_RE.match(answer):
            point = tuple(float(v) for v in m.groups())
        else:
            raise at.error(fields["answer_field"], f"expected a box '(x1, y1, x2, y2)' for task grounding, "
                           f"got '{answer}'")
    extra = {k: v for k, v in rec.items() if k not in _KEYS[schema]}
    return Sample(id=fields["id"] or default_id, task=task, source=source, images=fields["images"],
                  question=question, options=parse_options(question), answer=answer, bbox=bbox, point=point,
                  category=path_category(fields["images"]), metadata={**extra, **fields["metadata"]})


def absolute_path(p: str, root: Path) -> str:
    return os.path.normpath(p if os.path.isabs(p) else os.path.abspath(root / p))


# ----------------------------------------------------------------------------------------------- writing

@contextmanager
def atomic_write(path: str | os.PathLike, binary: bool = False, durable: bool = False) -> Iterator[IO]:
    """Open a temp file beside `path`; on success it is renamed over `path`, on error removed. It is created
    like open() does (mode 0666 less the umask): mkstemp's 0600 would hide a run's files from the other
    users of a shared runs folder. `durable`: fsync before the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") if binary else open(tmp, "x", encoding="utf-8") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_jsonl(records: Iterable[dict | BaseModel], path: str | os.PathLike) -> int:
    """Write one JSON object per line atomically (temp file in the same folder, fsync, rename); returns the count."""
    n = 0
    with atomic_write(path, durable=True) as f:
        for rec in records:
            text = rec.model_dump_json() if isinstance(rec, BaseModel) else json.dumps(rec, ensure_ascii=False)
            f.write(text + "\n")
            n += 1
    return n


def write_samples_jsonl(samples: Iterable[Sample], path: str | os.PathLike) -> int:
    """Write samples in our schema (one `model_dump_json()` per line), atomically."""
    return write_jsonl(samples, path)


def _question_text(sample: Sample) -> str:
    # The original tools only see the question text, so options stored apart are appended to it.
    if sample.options and parse_options(sample.question) != sample.options:
        letters = "\n".join(f"({chr(ord('A') + i)}) {o}" for i, o in enumerate(sample.options))
        return f"{sample.question}\nAnswer Choices:\n{letters}"
    return sample.question


def _relative(p: str, data_root: str | os.PathLike | None) -> str:
    if data_root is None:
        return p
    rel = os.path.relpath(p, data_root)
    return p if rel.startswith("..") else rel


def to_vlmsearch_record(sample: Sample, data_root: str | os.PathLike | None = None) -> dict:
    """Schema A record (single image); metadata keys become extra top-level keys (the original ignores them)."""
    if len(sample.images) != 1:
        raise ValueError(f"sample '{sample.id}': the vlmsearch schema holds one image, got {len(sample.images)} "
                         "(the original pre-concatenates image pairs)")
    extra = {k: v for k, v in sample.metadata.items() if k not in _KEYS["vlmsearch"] | _SCHEMAS.keys()}
    return {"id": sample.id, "image": _relative(sample.images[0], data_root),
            "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{_question_text(sample)}"},
                              {"from": "gpt", "value": sample.answer}], **extra}


def to_rl_record(sample: Sample, data_root: str | os.PathLike | None = None) -> dict:
    """Schema B record. No id or metadata: `datasets.load_dataset("json")` needs the same columns on every row."""
    return {"problem": IMAGE_TOKEN * len(sample.images) + "\n" + _question_text(sample),
            "answer": sample.answer, "images": [_relative(p, data_root) for p in sample.images]}
