"""Image data source specs (`FORMAT:ROOT`): parsing and validation, and where roots resolve.

`SourceSpec` is what configs (`data.normal`, `data.anomaly`) and `--source FORMAT:ROOT` give; this
module checks its form only (formats, class selectors, options) and turns a relative root into a
path under the data root. Listing and reading the source is source_catalogs.py / sources.py.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator, model_validator

from .images import DataError

FORMATS = ("idx", "folder", "elpv", "npz")
DEFAULT_TEST_FRACTION = 0.2
DATA_ROOT_ENV = "AMA_DATA_ROOT"


def _normalize_class(fmt: str | None, item: str | int | float) -> str | int | float:
    """One class selector in the form the format compares against (raises ValueError)."""
    if fmt in ("idx", "npz"):
        if isinstance(item, float) and item.is_integer():
            item = int(item)
        if isinstance(item, str) and item.strip().isdigit():
            item = int(item.strip())
        if not isinstance(item, int) or item < 0:
            raise ValueError(f"{fmt} classes are non-negative integer labels, got {item!r}")
        return item
    if fmt == "elpv":
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"elpv classes are defect probabilities such as 0, 0.333, 0.667, 1.0; got {item!r}") from None
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"elpv classes are defect probabilities in [0, 1], got {item!r}")
        return value
    name = str(item)
    if fmt == "folder" and not name.strip():
        raise ValueError("folder class names must not be empty")
    return name


class SourceSpec(BaseModel):
    """Where images come from; `data.normal` / `data.anomaly` in configs, `FORMAT:ROOT` on the command line."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["idx", "folder", "elpv", "npz"]  # idx (MNIST family), folder (one subfolder per class, or one folder = one class), elpv, npz
    root: str  # a relative root resolves against the data root
    classes: tuple[str | int | float, ...] | None = None  # None: every class
    split: Literal["train", "test", "all"] | None = None  # None: all, unless a protocol chooses
    cell_type: Literal["mono", "poly"] | None = None  # elpv only
    skip_corrupt: bool = False  # folder/elpv: log and skip undecodable images instead of failing

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data):
        # `normal: "idx:fashion-mnist"` in YAML or `--set data.anomaly=folder:/x` means FORMAT:ROOT
        if isinstance(data, str):
            fmt, root = _split_source_text(data)
            return {"format": fmt, "root": root}
        return data

    @field_validator("classes", mode="before")
    @classmethod
    def _normalize_classes(cls, value, info: ValidationInfo):
        if value is None:
            return None
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError("must be a list of class names or labels")
        if not value:
            raise ValueError("must not be empty (leave it out to take every class)")
        out: list[str | int | float] = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                raise ValueError(f"class {item!r} must be a name or a number")
            norm = _normalize_class(info.data.get("format"), item)
            if norm not in out:
                out.append(norm)
        return tuple(out)

    @model_validator(mode="after")
    def _check_format_options(self):
        if self.cell_type is not None and self.format != "elpv":
            raise ValueError(f"cell_type applies to elpv sources only, not {self.format}")
        if self.skip_corrupt and self.format not in ("folder", "elpv"):
            raise ValueError(f"skip_corrupt applies to folder and elpv sources only, not {self.format}")
        return self

    def with_split(self, split: Literal["train", "test", "all"] | None) -> "SourceSpec":
        return SourceSpec(**{**self.model_dump(), "split": split})

    def with_classes(self, classes: Sequence[str | int | float] | None) -> "SourceSpec":
        return SourceSpec(**{**self.model_dump(), "classes": classes})

    def __str__(self) -> str:
        text = f"{self.format}:{self.root}"
        if self.classes is not None:
            text += " classes=" + ",".join(str(c) for c in self.classes)
        if self.split is not None:
            text += f" split={self.split}"
        if self.cell_type is not None:
            text += f" cell_type={self.cell_type}"
        return text


def is_kafka_source(text: str) -> bool:
    """True for `kafka:TOPIC`, which only commands reading Kafka handle (before calling parse_source)."""
    return text.strip().lower().startswith("kafka:")


def _split_source_text(text: str) -> tuple[str, str]:
    if is_kafka_source(text):
        raise DataError(f"source {text!r}: this command cannot read kafka sources; "
                        f"give one of {', '.join(f + ':ROOT' for f in FORMATS)}")
    fmt, sep, root = text.strip().partition(":")
    fmt = fmt.strip().lower()
    if not sep or fmt not in FORMATS:
        raise DataError(f"source {text!r} must be FORMAT:ROOT with FORMAT one of {', '.join(FORMATS)} "
                        "(e.g. folder:/data/line3/good, idx:fashion-mnist)")
    if not root.strip():
        raise DataError(f"source {text!r} has an empty ROOT")
    return fmt, root.strip()


def parse_source(text: str, classes: str | Sequence[str | int | float] | None = None,
                 skip_corrupt: bool = False) -> SourceSpec:
    """`FORMAT:ROOT` (+ a class selection, a list or "a,b"; "" or None: every class) -> SourceSpec;
    DataError when malformed."""
    fmt, root = _split_source_text(text)
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()] or None
    try:
        return SourceSpec(format=fmt, root=root, classes=classes, skip_corrupt=skip_corrupt)
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'source'}: {e['msg']}" for e in exc.errors())
        raise DataError(f"source {text!r}: {reasons}") from None


def resolve_data_root(explicit: str | os.PathLike | None = None) -> Path:
    """The folder relative source roots resolve against.

    `explicit` (--data-root) if given, else $AMA_DATA_ROOT, else ../shared/datasets next to the
    repository (the folder above the ama_stream package) when it exists, else the current directory.
    """
    for value, what in ((explicit, "data root"), (os.environ.get(DATA_ROOT_ENV) or None, DATA_ROOT_ENV)):
        if value is not None:
            path = Path(value).expanduser()
            if not path.is_dir():
                raise DataError(f"{what} {str(value)!r} is not a directory")
            return path
    shared = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"
    return shared if shared.is_dir() else Path.cwd()


def resolve_root(spec: SourceSpec, data_root: str | os.PathLike | None = None) -> Path:
    """The source's root as an absolute path; DataError when it does not exist."""
    root = Path(spec.root).expanduser()
    hint = ""
    if not root.is_absolute():
        base = resolve_data_root(data_root)
        root = base / root
        hint = f" (relative roots resolve against the data root {base}; set --data-root or {DATA_ROOT_ENV})"
    if not root.exists():
        raise DataError(f"{spec.format} source root not found: {root}{hint}")
    return root.absolute()
