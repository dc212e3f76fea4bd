"""One policy document as block-style YAML, fast, in exactly the bytes PyYAML writes for it.

Drafts for a fleet hold tens of thousands of documents; PyYAML's pure-Python emitter spends most of `suggest`
on them, and its C emitter (libyaml) indents lists differently. `dump_document` writes the shapes policy
documents have (mappings with string keys, lists, strings, integers, booleans, None) itself, and only when every
string is one PyYAML writes on one line without escapes: a conservative character set (letters, digits and
`_ . / : = -`, nothing that could start an indicator, a comment or a document marker), plain, or single-quoted
when PyYAML's own resolver would read it back as another type (`'8080'`, `'yes'`, `'on'`, `'null'`, `'1:20'`,
`'0x1F'`), keys shorter than PyYAML's simple-key limit. Any other document (a name with a space, a quote, a line break, unicode, a key too
long, a type it does not know) goes to PyYAML itself, which quotes and escapes it as it always has: text from
flows stays data either way, and the bytes never depend on which path wrote them (a test compares the two on
generated documents, hostile strings included).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import yaml

WIDTH = 120
"""PyYAML's `width` for policy documents (lines of long quoted strings fold there)."""
_SIMPLE_KEY_MAX = 128 - len("!!str")
"""PyYAML writes a key this long or longer as an explicit `? key` entry (its limit of 128 counts the key's
tag, `!!str`, too): such keys never take the fast path."""
_PLAIN = re.compile(r"[A-Za-z0-9_/][A-Za-z0-9_./=-]*(?::[A-Za-z0-9_./=-]+)*")
"""Strings PyYAML writes plain on one line in block context: no leading `-`, `.`, `:`, no trailing `:`, no `: `,
no space, quote, `#`, flow or other indicator, no line break, ASCII only."""
_INDICATED = re.compile(r"[#,\[\]{}&*!|>\"%@`][!-&(-~]*")
"""Strings PyYAML writes single-quoted on one line: they start with an indicator that no plain scalar may start
with (`*` of a DNS pattern, `!`, `&`, ...), and hold printable ASCII only, no space and no quote to double (so
nothing to escape, fold or break)."""
_STR_TAG = "tag:yaml.org,2002:str"
_RESOLVER = yaml.resolver.Resolver()


class _Dumper(yaml.SafeDumper):
    """Block style, lists indented under their key (as kubectl writes them)."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


class _NotSimple(Exception):
    """The document holds something the fast path does not write: PyYAML writes it."""


def dump_document(document: dict[str, Any], *, allow_unicode: bool = True) -> str:
    """`document` as PyYAML's `_Dumper` writes it (block style, no key sorting, width 120)."""
    text = exact_document(document)
    return pyyaml_document(document, allow_unicode=allow_unicode) if text is None else text


def exact_document(document: Any) -> str | None:
    """`document` written by the fast path, or None when it holds anything the fast path leaves to PyYAML.

    What this path writes reads back, with PyYAML's safe loaders, as `document` itself, value for value and
    type for type: plain strings only where the loader's own resolver reads them as strings (quoted where it
    would not, with no quote inside), `str()` of integers, `true`/`false`/`null`, `{}`/`[]` for empty ones, and
    no other kind of node. So its output need not be parsed to be known (`Rendered.exact`).
    """
    lines: list[str] = []
    try:
        if not isinstance(document, dict) or not document:
            raise _NotSimple
        _mapping(document, 0, "", lines)
    except _NotSimple:
        return None
    lines.append("")
    return "\n".join(lines)


def pyyaml_document(document: Any, *, allow_unicode: bool = True) -> str:
    """`document` written by PyYAML itself (what `dump_document` falls back to, and must equal)."""
    return str(
        yaml.dump(
            document,
            Dumper=_Dumper,
            sort_keys=False,
            default_flow_style=False,
            allow_unicode=allow_unicode,
            width=WIDTH,
        )
    )


@lru_cache(maxsize=65536)
def _string(text: str) -> str | None:
    """`text` as PyYAML writes it when that is plain (`web`), or single-quoted because it would read back as
    another type (`'8080'`, `'yes'`, `''`) or starts with an indicator (`'*'`); None for anything else (PyYAML
    writes it)."""
    if not text:
        return "''"
    if _PLAIN.fullmatch(text) is None:
        return f"'{text}'" if _INDICATED.fullmatch(text) else None
    if _RESOLVER.resolve(yaml.ScalarNode, text, (True, False)) == _STR_TAG:
        return text
    return f"'{text}'"  # the characters allowed hold no quote to double


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        text = _string(value)
        if text is None:
            raise _NotSimple
        return text
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if type(value) is int:
        return str(value)
    if isinstance(value, dict) and not value:
        return "{}"
    if isinstance(value, list) and not value:
        return "[]"
    raise _NotSimple


def _key(key: Any) -> str:
    if not isinstance(key, str) or not key or len(key) >= _SIMPLE_KEY_MAX:  # `? ''` for an empty key
        raise _NotSimple
    return _scalar(key)


_KEYS: dict[str, str] = {}
"""Keys (strings) as the fast path writes them, kept: policy documents use a few keys again and again."""
_TEXTS: dict[str, str] = {}
"""String values as the fast path writes them, kept (up to `_KEPT` of them)."""
_KEPT = 65536


def _kept_key(key: Any) -> str:
    if type(key) is not str:
        return _key(key)
    text = _KEYS.get(key)
    if text is None:
        text = _key(key)  # raises for a key the fast path does not write: nothing is kept for it
        if len(_KEYS) >= _KEPT:
            _KEYS.clear()
        _KEYS[key] = text
    return text


def _mapping(mapping: dict[Any, Any], indent: int, first: str, lines: list[str]) -> None:
    """Keys at column `indent`; the first one after `first` (a list item's `- `, or the indentation)."""
    pad = " " * indent
    head = first or pad
    keys, texts = _KEYS, _TEXTS
    for key, value in mapping.items():
        text = keys.get(key) if type(key) is str else None
        if text is None:
            text = _kept_key(key)
        kind = type(value)
        if kind is str:
            scalar = texts.get(value)
            if scalar is None:
                scalar = _scalar(value)  # raises for a string the fast path does not write
                if len(texts) >= _KEPT:
                    texts.clear()
                texts[value] = scalar
            lines.append(f"{head}{text}: {scalar}")
        elif kind is dict and value:
            lines.append(f"{head}{text}:")
            _mapping(value, indent + 2, "", lines)
        elif kind is list and value:
            lines.append(f"{head}{text}:")
            _sequence(value, indent + 2, lines)
        else:
            lines.append(f"{head}{text}: {_scalar(value)}")
        head = pad


def _sequence(items: list[Any], indent: int, lines: list[str]) -> None:
    """Items at column `indent` (`- `), a mapping item's keys two columns further."""
    dash = " " * indent + "- "
    for item in items:
        if type(item) is dict and item:
            _mapping(item, indent + 2, dash, lines)
        elif type(item) is list and item:
            raise _NotSimple  # a list right inside a list: not a shape policies have
        else:
            lines.append(dash + _scalar(item))
