"""Config machinery: dataclasses are the single source of truth, YAML and `key=value` map onto them.

Merging and type coercion are OmegaConf's (structured configs): it rejects unknown keys and values
that do not convert to the field's type, and names the full dotted key. Range checks live in each
dataclass's ``__post_init__`` and raise :class:`ConfigError` through :func:`check`; the builder
below prefixes the dotted path so the message always names the key the user wrote.

Every field carries a one-line docstring (a string literal right after it, the way
simple_parsing reads them); :func:`field_docs` reads them back for ``--help``.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import os
import textwrap
import typing
from pathlib import Path
from typing import Any, TypeVar

from omni.errors import ConfigError
from omni.io import atomic_write_text

T = TypeVar("T")


def check(ok: bool, key: str, value: Any, expected: str) -> None:
    """Raise a ConfigError naming ``key``, the bad ``value`` and what is ``expected`` unless ``ok``."""
    if not ok:
        err = ConfigError(f"{key}={value!r} is invalid: expected {expected}")
        err.key = key  # type: ignore[attr-defined]
        err.value = value  # type: ignore[attr-defined]
        err.expected = expected  # type: ignore[attr-defined]
        raise err


def check_choice(value: Any, key: str, choices: typing.Iterable[Any]) -> None:
    choices = list(choices)
    check(value in choices, key, value, "one of " + ", ".join(repr(c) for c in choices))


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of dataclass ``cls`` (and its bases) to its docstring."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # pragma: no cover - source unavailable
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_type(tp: Any) -> type | None:
    """The dataclass inside ``tp`` (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp  # type: ignore[return-value]
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg  # type: ignore[return-value]
    return None


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """Flatten ``cls`` into ``(dotted key, default, doc)`` rows, for ``--help``."""
    rows = []
    docs = field_docs(cls)
    hints = _hints(cls)
    inst = cls()
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        sub = _dataclass_type(hints[f.name])
        if sub is not None and getattr(inst, f.name) is not None:
            rows.extend(describe(sub, key + "."))
        else:
            rows.append((key, repr(getattr(inst, f.name)), docs.get(f.name, "")))
    return rows


def help_text(cls: type, prefix: str = "") -> str:
    """An argparse epilog listing every ``key=value`` override of ``cls`` with default and doc."""
    rows = describe(cls, prefix)
    width = max(len(k) for k, _, _ in rows)
    lines = ["config keys (override with key=value):"]
    for key, default, doc in rows:
        lines.append(f"  {key:<{width}}  {doc} [default: {default}]")
    return "\n".join(lines)


def _build(cls: type[T], data: Any, path: str) -> T:
    """Construct dataclass ``cls`` from plain ``data`` (already type-checked by OmegaConf)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping of keys for {cls.__name__}, got {data!r}")
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        sub = _dataclass_type(hints[f.name])
        if sub is not None and value is not None:
            value = _build(sub, value, f"{path}{f.name}.")
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except ConfigError as e:
        key = getattr(e, "key", None)
        if key is not None and not str(key).startswith(path):
            full = path + key
            msg = str(e).replace(f"{key}=", f"{full}=", 1)
            err = ConfigError(msg)
            err.key = full  # type: ignore[attr-defined]
            raise err from None
        raise


def _omegaconf_message(e: Exception, cls: type) -> str:
    key = getattr(e, "full_key", None) or ""
    msg = getattr(e, "msg", None) or str(e).split("\n")[0]
    msg = msg.split("\n")[0]
    if type(e).__name__ == "ConfigKeyError" and key:
        parent, _, name = key.rpartition(".")
        owner = cls
        hints_path = parent.split(".") if parent else []
        for part in hints_path:
            owner = _dataclass_type(_hints(owner).get(part)) or owner
        valid = [f.name for f in dataclasses.fields(owner)]
        close = difflib.get_close_matches(name, valid, n=1)
        # the full dotted key: it works from the root of every command (`generate.max_new_tokens`)
        hint = f" Did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else ""
        where = f" under '{parent}'" if parent else ""
        return f"unknown config key '{key}'.{hint} Valid keys{where}: {', '.join(valid)}"
    if key and "is not a ListConfig" in msg:
        # OmegaConf's "AnyNode is not a ListConfig, TupleConfig, list, or tuple": a list field got a scalar
        return f"{key} must be a list: {key}=[a,b] (or {key}=[a] for one item)"
    return f"config key '{key}': {msg}" if key else msg


def _read_yaml(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"could not read config {path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping of config keys, got {type(data).__name__}")
    return data


def load_config(
    cls: type[T],
    *sources: str | os.PathLike | dict | None,
    overrides: typing.Sequence[str] = (),
) -> T:
    """Build ``cls`` from defaults, then each YAML file or dict in ``sources``, then ``overrides``.

    ``overrides`` are dotted ``key=value`` strings (``model.n_layers=4``). Unknown keys, values of
    the wrong type and out-of-range values raise :class:`ConfigError` naming the key.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise ConfigError(f"override {o!r} is not of the form key=value (for example model.n_layers=4)")
    try:
        merged = OmegaConf.structured(cls)
        for src in sources:
            if src is None:
                continue
            if isinstance(src, dict):
                layer = OmegaConf.create(src)
            else:
                layer = OmegaConf.create(_read_yaml(Path(src)))
            merged = OmegaConf.merge(merged, layer)
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_message(e, cls)) from None
    except Exception as e:  # yaml syntax errors and the like
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"could not read config: {type(e).__name__}: {e}") from None
    return _build(cls, data, "")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write ``cfg`` as YAML, atomically (temp file + rename), with each field's doc as a comment."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"# {type(cfg).__module__}.{type(cfg).__qualname__}, resolved\n"
    text += yaml.safe_dump(to_dict(cfg), sort_keys=False)
    atomic_write_text(path, text)
    return path
