"""Names and references: the only strings from users that become paths in the registry.

Everything that ends up in a path (task, tag, stored file name) passes through one of the
validators here first, so no value can escape the registry directory or hide as a dot-file.
Errors name the value and the rule, so the user knows what to type instead.
"""

from __future__ import annotations

import dataclasses
import re

from adapterhub.errors import InvalidReference

MAX_NAME_LENGTH = 100
MAX_FILE_NAME_LENGTH = 255
LATEST = "latest"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NAME_RULE = (
    f"use 1-{MAX_NAME_LENGTH} characters from A-Z a-z 0-9 . _ -, starting with a letter or digit, "
    "without '..'"
)
_FILE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")
FILE_RULE = (
    f"use 1-{MAX_FILE_NAME_LENGTH} characters from A-Z a-z 0-9 . _ + -, starting with a letter, "
    "digit or '_', without '/', '\\' or '..'"
)


def _shown(value: str, limit: int = 60) -> str:
    """repr() of a value, shortened so a 10 kB name does not flood the terminal."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def _check_name(kind: str, value: object, max_length: int = MAX_NAME_LENGTH) -> str:
    if not isinstance(value, str):
        raise InvalidReference(f"{kind} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidReference(f"{kind} is empty; {NAME_RULE}")
    if len(value) > max_length:
        raise InvalidReference(
            f"{kind} {_shown(value)} is too long ({len(value)} > {max_length} characters); {NAME_RULE}"
        )
    if not _NAME_RE.fullmatch(value) or ".." in value:
        raise InvalidReference(f"{kind} {_shown(value)} is not allowed; {NAME_RULE}")
    return value


def validate_task(name: object) -> str:
    """Return ``name`` if it is a valid task name, else raise InvalidReference naming the rule."""
    return _check_name("task name", name)


def validate_tag(name: object) -> str:
    """Tags share the task rule, and cannot look like a version number or the computed ``latest``."""
    _check_name("tag", name)
    assert isinstance(name, str)
    if name.isdigit():
        raise InvalidReference(
            f"tag {name!r} is purely numeric and would read as a version number; "
            "use a name with a letter, e.g. 'v" + name + "'"
        )
    if name == LATEST:
        raise InvalidReference("tag 'latest' is reserved: it always means the highest version")
    return name


def validate_file_name(name: object) -> str:
    """A file name stored in a manifest: one path component, never a path that leaves its folder."""
    if not isinstance(name, str) or not name:
        raise InvalidReference(f"file name {name!r} is empty or not a string; {FILE_RULE}")
    if len(name) > MAX_FILE_NAME_LENGTH:
        raise InvalidReference(f"file name {_shown(name)} is too long; {FILE_RULE}")
    if not _FILE_RE.fullmatch(name) or ".." in name:
        raise InvalidReference(f"file name {_shown(name)} is not allowed; {FILE_RULE}")
    return name


@dataclasses.dataclass(frozen=True)
class Reference:
    """``task`` (= latest), ``task@N`` (a version) or ``task@TAG``.

    Exactly one of ``version`` / ``tag`` is set, or neither for the computed latest version.
    """

    task: str
    version: int | None = None
    tag: str | None = None

    @classmethod
    def parse(cls, text: object) -> "Reference":
        return parse_reference(text)

    @property
    def is_latest(self) -> bool:
        return self.version is None and self.tag in (None, LATEST)

    @property
    def explicit(self) -> bool:
        """True when the text named a version or tag (``task@...``), not just a task."""
        return self.version is not None or self.tag is not None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.task}@{self.version}"
        if self.tag is not None:
            return f"{self.task}@{self.tag}"
        return self.task


_MAX_REFERENCE_LENGTH = 2 * MAX_NAME_LENGTH + 1


def parse_reference(text: object) -> Reference:
    """Parse a reference string; every malformed shape gets an error saying what is wrong.

    ``task@latest`` parses to ``Reference(task, tag="latest")``, which resolves like a bare task.
    """
    if isinstance(text, Reference):
        return text
    if not isinstance(text, str):
        raise InvalidReference(f"reference must be a string like 'task@3', got {type(text).__name__}")
    if not text:
        raise InvalidReference("reference is empty; write 'task', 'task@N' or 'task@TAG'")
    if len(text) > _MAX_REFERENCE_LENGTH:
        raise InvalidReference(
            f"reference {_shown(text)} is too long ({len(text)} > {_MAX_REFERENCE_LENGTH} characters)"
        )
    task, sep, selector = text.partition("@")
    validate_task(task)
    if not sep:
        return Reference(task)
    if not selector:
        raise InvalidReference(f"reference {text!r} has nothing after '@'; write '{task}@N' or '{task}@TAG'")
    if "@" in selector:
        raise InvalidReference(f"reference {text!r} has more than one '@'")
    if re.fullmatch(r"[+-]?\d+", selector):
        number = int(selector)
        if number < 1:
            raise InvalidReference(f"reference {text!r}: versions are numbered from 1, got {selector}")
        if not selector.isdigit():
            raise InvalidReference(f"reference {text!r}: write the version without a sign, e.g. '{task}@{number}'")
        return Reference(task, version=number)
    if selector == LATEST:
        return Reference(task, tag=LATEST)
    return Reference(task, tag=validate_tag(selector))
