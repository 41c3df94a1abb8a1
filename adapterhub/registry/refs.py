"""Parsing of registry references (NAME, NAME@ALIAS, NAME/VERSION, models:/...): pure functions."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from adapterhub.errors import RegistryError

MODELS_SCHEME = "models:/"
# A leading letter/digit/underscore keeps names from reading as CLI flags or as "." / ".."
# (names become cache directory names).
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
# MLflow's alias charset, restricted to ASCII.
_ALIAS_RE = re.compile(r"[A-Za-z0-9_-]{1,255}")
# MLflow reserves "vN" aliases because they would be ambiguous with versions.
_RESERVED_ALIAS_RE = re.compile(r"(?i)latest|v\d+")
_FORMS = "expected NAME, NAME@ALIAS, NAME/VERSION, models:/NAME/VERSION or models:/NAME@ALIAS"


@dataclass(frozen=True)
class AdapterRef:
    """A parsed registry reference: at most one of version and alias is set; neither = latest."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}/{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name


def validate_name(name: str) -> str:
    """Return `name` if it is a valid adapter name (letters, digits, - _ .), else RegistryError."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise RegistryError(
            f"invalid adapter name {name!r}: use 1-128 letters, digits, '-', '_' or '.', "
            "starting with a letter, digit or '_'"
        )
    return name


def validate_alias(alias: str) -> str:
    """Return `alias` if MLflow will accept it as a registered-model alias, else RegistryError."""
    if not isinstance(alias, str) or not _ALIAS_RE.fullmatch(alias):
        raise RegistryError(f"invalid alias {alias!r}: use letters, digits, '-' or '_'")
    if _RESERVED_ALIAS_RE.fullmatch(alias):
        raise RegistryError(f"invalid alias {alias!r}: 'latest' and 'v<N>' are reserved")
    return alias


def parse_version(version: int | str) -> int:
    """A positive version number from an int or its decimal string, else RegistryError."""
    text = str(version).strip()
    if isinstance(version, bool) or not _is_number(text) or int(text) < 1:
        raise RegistryError(f"invalid version {version!r}: expected a positive integer")
    return int(text)


def parse_ref(ref: str) -> AdapterRef:
    """Parse a registry reference; anything malformed raises RegistryError naming the problem."""
    if not isinstance(ref, str) or not ref.strip():
        raise RegistryError(f"malformed adapter reference {ref!r}: it is empty; {_FORMS}")
    text = ref.strip()
    body = text
    if text.startswith("models:"):
        if not text.startswith(MODELS_SCHEME) or text.startswith(MODELS_SCHEME + "/"):
            raise RegistryError(f"malformed adapter reference {ref!r}: {_FORMS}")
        body = text[len(MODELS_SCHEME):]

    def bad(reason: str) -> RegistryError:
        return RegistryError(f"malformed adapter reference {ref!r}: {reason}; {_FORMS}")

    if "@" in body:
        name, alias = body.split("@", 1)
        if not alias:
            raise bad("the alias after '@' is empty")
        if "@" in alias or "/" in alias:
            raise bad(f"invalid alias {alias!r}")
        if alias.lower() == "latest":
            # MLflow reserves this alias; reading it as "the latest version" is what users mean.
            ref_obj = AdapterRef(_checked_name(name, bad))
        else:
            ref_obj = AdapterRef(_checked_name(name, bad), alias=_checked_alias(alias, bad))
    elif "/" in body:
        name, version = body.split("/", 1)
        if version.lower() == "latest":
            ref_obj = AdapterRef(_checked_name(name, bad))
        elif _is_number(version) and int(version) >= 1:
            ref_obj = AdapterRef(_checked_name(name, bad), version=int(version))
        else:
            raise bad(f"version {version!r} is not a positive integer or 'latest'")
    else:
        ref_obj = AdapterRef(_checked_name(body, bad))
    return ref_obj


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdecimal()


def _checked_name(name: str, bad: Callable[[str], RegistryError]) -> str:
    if not name:
        raise bad("the adapter name is empty")
    try:
        return validate_name(name)
    except RegistryError as exc:
        raise bad(str(exc)) from None


def _checked_alias(alias: str, bad: Callable[[str], RegistryError]) -> str:
    try:
        return validate_alias(alias)
    except RegistryError as exc:
        raise bad(str(exc)) from None


def looks_like_path(ref: str) -> bool:
    """True when `ref` could be meant as a filesystem path (used to word errors for bad refs)."""
    text = ref.strip()
    if text.startswith(MODELS_SCHEME):
        return False
    return text.startswith((".", "~")) or "/" in text or "\\" in text
