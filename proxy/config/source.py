"""The YAML source: parsing the document, `${VAR}` expansion, key paths and file checks.

Owns what every section reader stands on: `read_document()` (the bytes of the file to
a Python document, with YAML errors that never quote a line), the `Reader` (the file
being read, the environment, and `fail()`, which turns a key path and a problem into a
`ConfigError`), the `Section` (one mapping and the only keys it may hold, which come
from the dataclasses through `yaml_keys()`), strings after `${VAR}` expansion, and
paths that must name readable files. Values of keys that look secret are never echoed.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import os
import re
import stat
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import yaml

from proxy.config.model import ConfigError, Secret

__all__ = [
    "MISSING",
    "KeyPath",
    "Read",
    "Reader",
    "Section",
    "dotted",
    "is_secretish",
    "key_segment",
    "read_document",
    "show",
    "type_name",
    "yaml_keys",
]

_T = TypeVar("_T")

KeyPath = tuple[str, ...]
# A typed read of one value: the reader (for `fail` and `${VAR}`), its key path, the value.
Read = Callable[["Reader", KeyPath, object], _T]
MISSING: Any = object()

# Values of keys with these words in their names are never echoed in a message: a
# misplaced secret (say, the secret itself written into client_secret_file) must not
# end up in a log line.
_SECRET_WORDS = ("secret", "assertion", "key", "password")
_MERGE_TAG = "tag:yaml.org,2002:merge"
_ENV_REFERENCE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$\{")
# Secret and key files are only read at load to check them; a secret is not megabytes.
_MAX_CHECKED_FILE_SIZE = 1 << 20


def yaml_keys(
    model: type[Any],
    *,
    skip: Collection[str] = (),
    expand: Mapping[str, Sequence[str]] | None = None,
) -> tuple[str, ...]:
    """The YAML keys of a section: `model`'s field names, in their order.

    `skip` names fields that do not come from the section (an upstream's `name` is its
    key one level up); `expand` maps a field to the YAML keys it is read from (an
    upstream's `tls` is its `ca_file`, `client_cert_file` and `client_key_file`).
    """
    keys: list[str] = []
    for field in dataclasses.fields(model):
        if field.name not in skip:
            keys.extend((expand or {}).get(field.name, (field.name,)))
    return tuple(keys)


# ---------------------------------------------------------------------------
# Showing values and key paths in messages
# ---------------------------------------------------------------------------


def show(value: object, limit: int = 80) -> str:
    """A value quoted for a message: printable, escaped and bounded in length."""
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return "'" + "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) + "'"


# What YAML can produce, as an error message names it; bool before int (a subclass).
_TYPE_NAMES: tuple[tuple[type, str], ...] = (
    (type(None), "null"),
    (bool, "a boolean"),
    (int, "an integer"),
    (float, "a number"),
    (str, "a string"),
    (list, "a list"),
    (dict, "a mapping"),
    (datetime.date, "a date"),
    (bytes, "binary data"),
    (set, "a set"),
)


def type_name(value: object) -> str:
    """How an error message names the type of a YAML value (`a string`, `null`, ...)."""
    for kind, name in _TYPE_NAMES:
        if isinstance(value, kind):
            return name
    return type(value).__name__


def dotted(path: KeyPath) -> str:
    text = ""
    for part in path:
        if part.startswith("[") or not text:
            text += part
        else:
            text += "." + part
    return text


def key_segment(key: object) -> str:
    text = str(key)
    if len(text) > 60:
        text = text[:60] + "..."
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def is_secretish(path: KeyPath) -> bool:
    key = next((part for part in reversed(path) if not part.startswith("[")), "")
    return any(word in key for word in _SECRET_WORDS)


# ---------------------------------------------------------------------------
# The document
# ---------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that rejects a key given twice instead of keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable: the base constructor reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {show(key)}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_document(path: str | Path) -> object:
    """The parsed YAML of the file at `path`; a `ConfigError` naming it otherwise."""
    file = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(file, "", f"cannot read the config file: {error.strerror}") from None
    try:
        return yaml.load(data, Loader=_StrictLoader)  # a SafeLoader
    except yaml.MarkedYAMLError as error:
        # Only the problem and its position: the library's snippet of the offending line
        # could contain a secret.
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = error.problem or error.context or "syntax error"
        raise ConfigError(file, "", f"invalid YAML{where}: {problem}") from None
    except yaml.YAMLError as error:
        position = getattr(error, "position", None)
        where = f" at position {position}" if position is not None else ""
        reason = getattr(error, "reason", None) or "unreadable document"
        raise ConfigError(file, "", f"invalid YAML{where}: {reason}") from None
    except RecursionError:
        raise ConfigError(file, "", "invalid YAML: nested too deeply") from None
    except Exception:
        # PyYAML's scalar constructors raise plain ValueError/KeyError/... for values
        # such as `2024-13-45` or `!!float abc`; their text may quote the value.
        raise ConfigError(
            file, "", "invalid YAML: a value could not be read (an invalid date or !!tag?)"
        ) from None


# ---------------------------------------------------------------------------
# The reader and its sections
# ---------------------------------------------------------------------------


class Reader:
    """Reads one parsed document: the file it came from, its directory, the environment."""

    def __init__(self, file: str, base_dir: Path, environ: Mapping[str, str]) -> None:
        self.config_file = file
        self.base_dir = base_dir
        self.environ = environ

    def fail(self, path: KeyPath, problem: str) -> NoReturn:
        raise ConfigError(self.config_file, dotted(path), problem)

    def section(self, path: KeyPath, value: object, allowed: Sequence[str]) -> Section:
        return Section(self, path, value, allowed)

    def expand(self, path: KeyPath, text: str) -> str:
        """Expand `${VAR}` from the environment; `$${` is a literal `${`."""

        def replace(reference: re.Match[str]) -> str:
            if reference.group(0) == "$${":
                return "${"
            name = reference.group(1)
            if name is None:
                self.fail(path, "malformed ${...}: expected ${NAME} (write $${ for a literal ${)")
            value = self.environ.get(name)
            if value is None:
                self.fail(path, f"environment variable {name} is not set")
            return value

        if "${" not in text:
            return text
        return _ENV_REFERENCE.sub(replace, text)

    def string(self, path: KeyPath, value: object, *, allow_empty: bool = False) -> str:
        if not isinstance(value, str):
            self.fail(path, f"expected a string, got {type_name(value)}")
        text = self.expand(path, value)
        if not allow_empty and not text.strip():
            self.fail(path, "must not be empty")
        return text

    def string_list(self, path: KeyPath, value: object, *, split: bool) -> tuple[str, ...]:
        """A list of strings, or (when `split`) one string of space-separated words."""
        if split and isinstance(value, str):
            return tuple(self.string(path, value, allow_empty=True).split())
        if isinstance(value, str):
            return (self.string(path, value),)
        if not isinstance(value, list):
            self.fail(path, f"expected a string or a list of strings, got {type_name(value)}")
        return tuple(
            self.string((*path, f"[{index}]"), item).strip() for index, item in enumerate(value)
        )

    def items(
        self, path: KeyPath, value: object, *, what: str, example: str, empty: str
    ) -> list[tuple[KeyPath, object]]:
        """A non-empty YAML list of `what`, as (key path, item) pairs; a one-line error
        otherwise (`example` says how to write one value as a list, for a lone value)."""
        if not isinstance(value, list):
            one = isinstance(value, str | int) and not isinstance(value, bool)
            hint = f" (write {example})" if one else ""
            self.fail(path, f"expected a list of {what}, got {type_name(value)}{hint}")
        if not value:
            self.fail(path, empty)
        return [((*path, f"[{index}]"), item) for index, item in enumerate(value)]

    def secret(self, path: KeyPath, value: object) -> Secret:
        if not isinstance(value, str):
            self.fail(path, f"expected a string, got {type_name(value)}")
        text = self.expand(path, value)
        if not text:
            self.fail(path, "must not be empty")
        return Secret(text)

    # -- files ---------------------------------------------------------------

    def file_path(self, path: KeyPath, value: object) -> tuple[str, Path]:
        """The text as written, and the path it names (relative: to the config's directory)."""
        text = self.string(path, value)
        if any(not char.isprintable() for char in text):
            self.fail(path, "file names must not contain control characters")
        file_path = Path(text)
        if not file_path.is_absolute():
            file_path = Path(os.path.abspath(self.base_dir / file_path))
        return text, file_path

    def file(self, path: KeyPath, value: object) -> Path:
        """A path that must name a readable regular file."""
        text, file_path = self.file_path(path, value)
        where = "" if is_secretish(path) else f" {show(text)}"
        try:
            status = os.stat(file_path)
        except FileNotFoundError:
            self.fail(path, f"file{where} does not exist")
        except OSError as error:
            self.fail(path, f"cannot access file{where}: {error.strerror}")
        if not stat.S_ISREG(status.st_mode):
            kind = "a directory" if stat.S_ISDIR(status.st_mode) else "not a regular file"
            self.fail(path, f"file{where} is {kind}")
        try:
            with open(file_path, "rb"):
                pass
        except OSError as error:
            self.fail(path, f"cannot read file{where}: {error.strerror}")
        return file_path

    def read_file(self, path: KeyPath, file_path: Path) -> bytes:
        """Contents of a file `file()` accepted, for a check only: never stored."""
        try:
            with open(file_path, "rb") as file:
                data = file.read(_MAX_CHECKED_FILE_SIZE + 1)
        except OSError as error:
            self.fail(path, f"cannot read file: {error.strerror}")
        if len(data) > _MAX_CHECKED_FILE_SIZE:
            self.fail(path, "file is larger than 1 MiB")
        return data

    def secret_file(self, path: KeyPath, value: object) -> Path:
        """A readable file with something in it; re-read at use, never stored."""
        file_path = self.file(path, value)
        if not self.read_file(path, file_path).strip():
            self.fail(path, "file is empty")
        return file_path

    def output_file(self, path: KeyPath, value: object) -> Path:
        """A file the proxy will write: its directory must exist."""
        text, file_path = self.file_path(path, value)
        if file_path.is_dir():
            self.fail(path, f"{show(text)} is a directory; expected a file name")
        if not file_path.parent.is_dir():
            self.fail(path, f"directory {show(file_path.parent)} does not exist")
        return file_path


class Section:
    """One YAML mapping being read: its key path, and only the keys it may contain."""

    def __init__(
        self, reader: Reader, path: KeyPath, value: object, allowed: Sequence[str]
    ) -> None:
        if not isinstance(value, dict):
            reader.fail(path, f"expected a mapping, got {type_name(value)}")
        for key in value:
            if not isinstance(key, str):
                reader.fail(
                    (*path, key_segment(key)),
                    f"keys must be strings, got {type_name(key)}",
                )
            if key not in allowed:
                reader.fail((*path, key_segment(key)), _unknown_key_problem(key, allowed))
        self.reader = reader
        self.path = path
        self.values: dict[str, object] = value

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def key_path(self, key: str) -> KeyPath:
        return (*self.path, key)

    def get(self, key: str) -> object:
        return self.values.get(key, MISSING)

    def fail(self, key: str, problem: str) -> NoReturn:
        self.reader.fail(self.key_path(key), problem)

    def optional(self, key: str, read: Read[_T]) -> _T | None:
        value = self.get(key)
        return None if value is MISSING else read(self.reader, self.key_path(key), value)

    def with_default(self, key: str, read: Read[_T], default: _T) -> _T:
        value = self.get(key)
        return default if value is MISSING else read(self.reader, self.key_path(key), value)

    def mapping(self, key: str, of_what: str) -> dict[object, object] | None:
        """The mapping at `key`, None when the key is absent; anything else fails,
        saying what the mapping maps (`of_what`, e.g. "parameter names to values")."""
        value = self.get(key)
        if value is MISSING:
            return None
        if not isinstance(value, dict):
            self.fail(key, f"expected a mapping of {of_what}, got {type_name(value)}")
        return value

    def required(self, key: str, read: Read[_T]) -> _T:
        value = self.get(key)
        if value is MISSING:
            self.fail(key, "missing")
        return read(self.reader, self.key_path(key), value)


def _unknown_key_problem(key: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean {close[0]}?)"
    return f"unknown key (expected one of: {', '.join(allowed)})"
