"""docs/configuration.md, generated from the settings models themselves:

    python -m training.configdoc > docs/configuration.md

Every key of the training config (training.config.TrainConfig) and of the agent
(ama_stream.agent.settings.AgentSettings) with its type, default and meaning. The meaning is the
comment the field carries in its source: the comment lines right above it and/or the comment at
the end of its line (the one place it is written; tests/test_configdoc.py checks that the file is
current and that no key goes undocumented).
"""
from __future__ import annotations

import inspect
import json
import re
import sys
import typing

from pydantic import BaseModel

_FIELD = re.compile(r"^\s{4}(\w+)\s*:[^=#]*(?:=.*?)?(?:#\s*(.*))?$")
_COMMENT = re.compile(r"^\s{4}#\s?(.*)$")


def field_comments(cls: type[BaseModel]) -> dict[str, str]:
    """{field: its comment} read from the class body (the comments above it, then the one after it)."""
    out: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        comment = _COMMENT.match(line)
        if comment:
            pending.append(comment.group(1).strip())
            continue
        field = _FIELD.match(line)
        if field and field.group(1) in cls.model_fields:
            text = " ".join(pending + ([field.group(2).strip()] if field.group(2) else []))
            out[field.group(1)] = text
        pending = []
    return out


def _section_class(annotation) -> type[BaseModel] | None:
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_class(arg)
        if found is not None:
            return found
    return None


def _type_name(annotation) -> str:
    text = str(annotation).replace("typing.", "").replace("NoneType", "None").replace("pathlib.", "")
    return re.sub(r"<class '([\w.]+)'>", lambda m: m.group(1).rsplit(".", 1)[-1], text)


def _default(field) -> str:
    if field.is_required():
        return "(required)"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return ""
    try:
        return json.dumps(value, default=str)
    except TypeError:
        return str(value)


def rows(cls: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, meaning) of every leaf key, sections expanded in order."""
    comments = field_comments(cls)
    out = []
    for name, field in cls.model_fields.items():
        key = f"{prefix}{name}"
        section = _section_class(field.annotation)
        meaning = comments.get(name, "")
        if section is not None and _default(field) == "":
            doc = inspect.getdoc(section) or ""
            if meaning or doc:
                out.append((key, "section", "", meaning or doc.splitlines()[0]))
            out += rows(section, key + ".")
            continue
        if section is not None:  # a source spec and the like: a mapping (or FORMAT:ROOT text)
            meaning = meaning or (inspect.getdoc(section) or "").splitlines()[0]
            out.append((key, section.__name__, _default(field), meaning))
            out += [(f"{key}.{k}", t, d, m) for k, t, d, m in rows(section)]
            continue
        out.append((key, _type_name(field.annotation), _default(field), meaning))
    return out


def _table(title: str, intro: str, cls: type[BaseModel]) -> str:
    lines = [f"## {title}", "", intro, "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for key, kind, default, meaning in rows(cls):
        cells = [f"`{key}`", kind.replace("|", "\\|"), f"`{default}`" if default else "", meaning.replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render() -> str:
    from ama_stream.agent.settings import AgentSettings

    from .config import TrainConfig

    return "\n".join([
        "# Configuration reference",
        "",
        "Generated from the settings models by `python -m training.configdoc > docs/configuration.md`; "
        "tests/test_configdoc.py fails when it is out of date. Every key can be set in the YAML file, as an "
        "`AMA_*` environment variable (nested keys joined with `__`, e.g. `AMA_TRAIN__EPOCHS=5`) or with "
        "`--set dotted.key=value` (values parsed as YAML); the command line wins over the environment, "
        "which wins over the file.",
        "",
        _table("Training (`ama-stream train --config FILE`)",
               "configs/*.yaml; configs/own_data.yaml is the template for your own images.", TrainConfig),
        _table("Agent (`ama-stream serve --config FILE`)",
               "configs/agent.yaml; the serve flags (--bootstrap, --checkpoint, ...) set the same keys.", AgentSettings),
    ])


if __name__ == "__main__":
    sys.stdout.write(render())
