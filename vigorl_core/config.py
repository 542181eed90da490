"""Stage configuration: pydantic models loaded from YAML and overridden on the command line.

    python -m jobs.synth --config configs/synth.yaml --task grounding --n=8 --zoom.offset 40

`--config FILE` is read first, then every `--key value` / `--key=value` (dotted keys reach nested models)
in order. Values are parsed as YAML scalars (`--flag true`, `--n 8`, `--sizes [1,2]`). Unknown keys and
bad values fail fast with the field path in the message; `--help` lists every field with its description.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class ConfigError(ValueError):
    pass


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--{dotted}: {key!r} is a value, not a section")
        node = child
    node[leaf] = value


def _parse_scalar(text: str) -> Any:
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
    """Build `model` from `--config FILE` plus `--key value` overrides; raises ConfigError on bad input."""
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
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key} needs a value")
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
            tree.update(loaded)
        else:
            overrides.append((key.replace("-", "_"), _parse_scalar(value)))
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
