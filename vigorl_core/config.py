"""Stage configuration: pydantic models loaded from YAML and overridden on the command line.

    python -m jobs.synth --config configs/synth.yaml --task grounding --n=8 --zoom.offset 40

`--config FILE` (repeatable; later files merge deeply into earlier ones, section by section) is read
first, then every `--key value` / `--key=value` (dotted keys reach nested models) in order. Values are
parsed as YAML scalars (`--flag true`, `--n 8`, `--sizes [1,2]`), except for a field annotated `str`,
which takes the text as written (`--run_name 2024`, `--run_name off`); a `str | None` field reads only
`null` or `~` as None. Unknown keys and bad values fail fast with the field path in the message; `--help`
lists every field with its description.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

M = TypeVar("M", bound=BaseModel)


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class ConfigError(ValueError):
    pass


def _custom_only(resources: dict[str, float]) -> dict[str, float]:
    builtin = sorted(set(resources) & {"CPU", "GPU", "memory", "object_store_memory"})
    if builtin:
        raise ValueError(f"{builtin} have their own fields; list custom resources here (e.g. policy_node)")
    return resources


# Custom Ray resources a piece of a stage requests besides CPUs and GPUs, e.g. {policy_node: 0.01}: on a
# cluster (cluster.yaml, deploy/kuberay/) each node type offers one role resource, so the request lands
# the piece on that node type and makes the autoscaler start one. Empty (the default) runs anywhere.
RoleResources = Annotated[dict[str, Annotated[float, Field(gt=0)]], AfterValidator(_custom_only)]


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--{dotted}: {key!r} is a value, not a section")
        node = child
    node[leaf] = value


def _merge(tree: dict[str, Any], update: dict[str, Any]) -> None:
    """Deep merge: a later file's `engine: {dtype: x}` keeps the earlier file's other engine keys."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _merge(tree[key], value)
        else:
            tree[key] = value


def _field_annotation(model: type[BaseModel], dotted: str) -> Any:
    """Annotation of the field at `dotted` (through nested models), or None when the path leaves the models
    (unknown keys, dict fields): validation reports those."""
    annotation: Any = model
    for key in dotted.split("."):
        candidates = get_args(annotation) or (annotation,)  # a model, or the model inside `Model | None`
        models = [a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)]
        if not models or key not in models[0].model_fields:
            return None
        annotation = models[0].model_fields[key].annotation
    return annotation


def _parse_value(text: str, annotation: Any) -> Any:
    # YAML reads `2024` as an int and `off`/`yes` as bools, which a str field then rejects: str fields
    # take the text itself, and an optional str only takes YAML's explicit nulls as None.
    if annotation is str:
        return text
    if get_origin(annotation) in (Union, types.UnionType) and set(get_args(annotation)) == {str, type(None)}:
        return None if text in ("null", "~") else text
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def help_text(model: type[BaseModel], prefix: str = "") -> str:
    lines = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.append(help_text(annotation, f"{prefix}{name}."))
            continue
        default = "" if field.is_required() else f" (default: {field.get_default(call_default_factory=True)!r})"
        lines.append(f"  --{prefix}{name}{default}\n      {field.description or ''}")
    return "\n".join(lines)


def parse_config(model: type[M], argv: list[str], *, prog: str = "vigorl") -> M:
    """Build `model` from `--config FILE` plus `--key value` overrides (a boolean field also takes a bare
    `--key`: true); raises ConfigError on bad input."""
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: {prog} [--config FILE.yaml] [--key value ...]\n\n{model.__doc__ or ''}\n")
        print(help_text(model))
        raise SystemExit(0)
    tree: dict[str, Any] = {}
    overrides: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: options look like --key value or --key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            bare = i + 1 >= len(argv) or argv[i + 1].startswith("--")
            if bare and _field_annotation(model, key.replace("-", "_")) is bool:
                value = "true"  # a bare boolean flag: --fast
            elif bare:
                raise ConfigError(f"--{key} needs a value")
            else:
                value = argv[i + 1]
                i += 1
        i += 1
        if key == "config":
            path = Path(value)
            if not path.is_file():
                raise ConfigError(f"--config: no such file {path}")
            loaded = yaml.safe_load(path.read_text()) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path}: expected a mapping of settings at the top level")
            _merge(tree, loaded)
        else:
            key = key.replace("-", "_")
            overrides.append((key, _parse_value(value, _field_annotation(model, key))))
    for key, value in overrides:
        _set_dotted(tree, key, value)
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
            + (f" (got {e['input']!r})" if e["type"] not in ("extra_forbidden", "missing") and "input" in e else "")
            for e in err.errors())
        raise ConfigError(f"bad configuration: {problems}") from None
