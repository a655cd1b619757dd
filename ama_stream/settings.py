"""Settings machinery shared by every command: YAML file < environment (AMA_*) < command line.

Each command's settings are a frozen pydantic-settings model (env prefix `AMA_`, nested
delimiter `__`, unknown keys rejected). `load_settings` reads an optional YAML file, applies
the environment, then the command line (`--set dotted.key=value`, values parsed as YAML, and the
command's own flags), and turns every validation failure into one readable line.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class SettingsError(ValueError):
    """A configuration problem, phrased for the user in one line."""


class Section(BaseModel):
    """A nested settings section: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class AmaSettings(BaseSettings):
    """Base of every command's settings model."""

    model_config = SettingsConfigDict(
        env_prefix="AMA_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest priority first: command line (passed as init kwargs), environment, YAML file.
        return (init_settings, env_settings, _FileDataSource(settings_cls))


class _FileDataSource(PydanticBaseSettingsSource):
    """The parsed YAML file, handed over by load_settings through a class attribute of the model."""

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ does all the work
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(getattr(self.settings_cls, "__ama_file_data__", {}) or {})


T = TypeVar("T", bound=AmaSettings)

MAX_CONFIG_BYTES = 1 << 20  # a config is a page of YAML; anything near this is not one


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without anchors/aliases: a few hundred bytes of nested aliases (a "billion laughs"
    document) expand to gigabytes, and a hand-written config never needs them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not accepted",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)


def safe_yaml(text: str):
    """yaml.safe_load that refuses aliases."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise SettingsError(f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes; not a config")
        text = path.read_text()
    except FileNotFoundError:
        raise SettingsError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise SettingsError(f"config path is a directory, not a file: {path}") from None
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"config file {path} is not UTF-8 text") from None
    try:
        data = safe_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        why = f": {exc.problem}" if getattr(exc, "problem", None) and "alias" in str(exc.problem) else ""
        raise SettingsError(f"config file {path} is not valid YAML{where}{why}") from None
    except RecursionError:
        raise SettingsError(f"config file {path} nests too deeply to be a config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path} must hold a mapping at the top level, not {type(data).__name__}")
    return data


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """['a.b=1', 'c=[x, y]'] -> {'a': {'b': 1}, 'c': ['x', 'y']} (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise SettingsError(f"--set expects dotted.key=value, got {item!r}")
        try:
            value = safe_yaml(raw) if raw.strip() else None
        except (yaml.YAMLError, RecursionError):
            raise SettingsError(f"--set {key}: value {raw!r} is not valid YAML") from None
        set_dotted(out, key, value)
    return out


def set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    node = target
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SettingsError(f"--set {dotted}: '{part}' is set to a value and to sub-keys")
        node = child
    node[parts[-1]] = value


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge, `top` wins."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def format_validation_error(exc: ValidationError, prefix: str = "invalid settings") -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "(top level)"
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown key"
        elif "input" in err and not isinstance(err["input"], (dict, list)):
            msg = f"{msg} (got {err['input']!r})"
        parts.append(f"{loc}: {msg}")
    return f"{prefix}: " + "; ".join(parts)


def _drop_dotted(data: dict[str, Any], dotted: str) -> None:
    node: Any = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(parts[-1], None)


ENV_PREFIX = "AMA_"
# AMA_* names that are not keys of every command's settings: switches of the tools around them, and
# the top-level keys of the OTHER commands (the training config's and the agent's), so that one shell
# can hold both. tests/test_settings.py keeps these sets equal to the models' fields.
TOOL_ENV = frozenset({"data_root", "cache_dir", "log_level", "log_json", "debug", "require_compiled", "skip_cuda",
                      "force_cuda", "test_bootstrap"})
TRAIN_KEYS = frozenset({"data", "model", "loss", "optim", "train", "policy", "score", "seed", "device", "data_root"})
AGENT_KEYS = frozenset({"kafka", "topics", "group_id", "delivery", "agent_id", "batching", "limits", "metrics",
                        "retry", "device", "runtime", "torch_threads", "checkpoint", "calibration",
                        "calibration_check_s", "model_reload", "model_dirs", "control_key", "drift", "max_frames",
                        "idle_exit_s", "consumer", "producer"})


def check_environment(cls: type[BaseModel], environ: dict[str, str] | None = None) -> None:
    """Refuse an AMA_* variable that names no setting anywhere (a misspelling like AMA_GROUPID would
    otherwise be ignored in silence, while a misspelled nested key is refused)."""
    known = set(cls.model_fields) | TOOL_ENV | TRAIN_KEYS | AGENT_KEYS
    for name in sorted(os.environ if environ is None else environ):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        top = name[len(ENV_PREFIX):].lower().split("__", 1)[0]
        if top not in known:
            close = difflib.get_close_matches(top, sorted(cls.model_fields), n=1)
            hint = f" (did you mean {ENV_PREFIX}{close[0].upper()}?)" if close else ""
            raise SettingsError(f"environment variable {name} is not an ama-stream setting{hint}")


def load_settings(
    cls: type[T],
    config_file: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    replace: tuple[str, ...] = (),
) -> T:
    """Build `cls` from YAML file < environment < overrides; raises SettingsError with one line.

    Sources merge key by key; `replace` names dotted keys whose whole value the overrides replace
    (the file's sub-keys there are dropped first), e.g. "data.normal" for a new source."""
    check_environment(cls)
    file_data = read_yaml_file(config_file) if config_file else {}
    for dotted in replace:
        _drop_dotted(file_data, dotted)
    holder = type(cls.__name__, (cls,), {"__ama_file_data__": file_data, "__module__": cls.__module__})
    try:
        return holder(**(overrides or {}))  # an instance of a subclass of `cls`
    except ValidationError as exc:
        raise SettingsError(format_validation_error(exc)) from None


def masked(value: Any, secret_keys: tuple[str, ...] = ("password", "secret", "token")) -> Any:
    """A copy of plain settings data with secret-looking values replaced by '***', for logs."""
    if isinstance(value, dict):
        return {
            k: ("***" if v not in (None, "") and any(s in k.lower() for s in secret_keys) else masked(v, secret_keys))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [masked(v, secret_keys) for v in value]
    return value
