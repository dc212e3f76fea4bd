"""Istio request paths: how the sidecar normalises and matches them, what istiod accepts, and drafted `paths`.

Written from Istio's documented semantics for `AuthorizationPolicy` `paths`:

- Before any policy is evaluated, the sidecar normalises the path (the default `BASE` option, RFC 3986 plus
  backslashes): `.` and `..` segments are resolved (`/a/../admin` is `/admin`), a percent-encoded unreserved
  character is decoded (`%41` is `A`, `%2e` a dot), `\\` becomes `/`, characters a path may not hold raw
  (space, `"`, `<`, `>`, `^`, a backtick, `{`, `|`, `}`, control and non-ASCII bytes) are percent-encoded, and
  a request holding `%00` is refused with 400. `%2F` stays encoded and `//` stays as it is (only the
  `MERGE_SLASHES` and `DECODE_AND_MERGE_SLASHES` options change them). The query string is never matched.
- A `paths` entry is a string match: `*` alone (any path), `*suffix`, `prefix*`, else exact (a `*` elsewhere is
  a literal character).
- Since Istio 1.22 an entry holding `{*}` or `{**}` is a URI template instead: `{*}` is one non-empty segment
  of path characters, `{**}` any number of segments (it must be the last operator). istiod refuses every other
  `{` or `}`, and, in a template, a literal segment that is not made of path characters.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

from flowpipe.errors import ConfigError
from flowpipe.policy._l7 import ID_SEGMENT

TEMPLATES_SINCE = (1, 22)
"""The first Istio release whose `paths` take the templates `{*}` and `{**}`."""

ONE_SEGMENT, ANY_SEGMENTS = "{*}", "{**}"
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_ENCODED_RAW = frozenset(' "#<>?^`{|}')
_PATH_CHARS = r"a-zA-Z0-9._~%!$&'()+,;:@\-"
"""Characters of a template segment, as the proxy's template matcher reads them (RFC 3986 pchar without `*=`)."""
_ISTIOD_LITERAL = re.compile(r"[a-zA-Z0-9._~%!$&'()+,;:@=\-]+")
_SEGMENT = re.compile(f"[{_PATH_CHARS}]+")


def parse_istio_version(text: str) -> tuple[int, int]:
    """`1.22`, `1.22.3` or `v1.22` as (major, minor); `ConfigError` for anything else."""
    match = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.\d+)?(?:[-+].*)?", text.strip())
    if match is None:
        raise ConfigError(f"--istio-version {text!r}: expected a release such as 1.22 or 1.21.4")
    return int(match.group(1)), int(match.group(2))


def supports_templates(istio_version: str) -> bool:
    """Whether this Istio release reads `{*}` and `{**}` in `paths` (1.22 and later)."""
    return parse_istio_version(istio_version) >= TEMPLATES_SINCE


def normalize_path(path: str) -> str | None:
    """The path as the sidecar matches it (default `BASE` normalisation, query string dropped).

    >>> normalize_path("/a/../admin?x=1"), normalize_path("/details/{id}"), normalize_path("/%61pi/%2F")
    ('/admin', '/details/%7Bid%7D', '/api/%2F')

    None when the sidecar refuses the request whatever the policies say (a `%00` or NUL in the path).
    """
    data = path.split("?", 1)[0].encode("utf-8", "surrogateescape")
    out: list[str] = []
    i = 0
    while i < len(data):
        byte = data[i]
        escape = data[i + 1 : i + 3].decode("ascii", "replace") if byte == 0x25 else ""
        if len(escape) == 2 and all(c in string.hexdigits for c in escape):
            value = int(escape, 16)
            if value == 0:
                return None
            out.append(chr(value) if chr(value) in _UNRESERVED else "%" + escape)
            i += 3
            continue
        char = chr(byte)
        if byte == 0:
            return None
        if char == "\\":
            out.append("/")
        elif byte < 0x21 or byte >= 0x7F or char in _ENCODED_RAW:
            out.append(f"%{byte:02X}")
        else:
            out.append(char)
        i += 1
    text = "".join(out)
    segments = (text.removeprefix("/")).split("/")
    kept: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment in (".", ".."):
            if segment == ".." and kept:
                kept.pop()
            if last:
                kept.append("")
            continue
        kept.append(segment)
    return "/" + "/".join(kept)


def string_matches(pattern: str, value: str) -> bool:
    """Istio string matching: `*` (any non-empty value), `*suffix`, `prefix*`, else exact."""
    if pattern == "*":
        return bool(value)
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


def is_template(pattern: str) -> bool:
    """Whether Istio 1.22 and later read this `paths` entry as a URI template."""
    return ONE_SEGMENT in pattern or ANY_SEGMENTS in pattern


def path_matches(pattern: str, path: str, *, templates: bool = True) -> bool:
    """Whether a `paths` entry matches a request path already normalised by `normalize_path`."""
    if templates and is_template(pattern):
        return _template_regex(pattern).fullmatch(path) is not None
    return string_matches(pattern, path)


@lru_cache(maxsize=1024)
def _template_regex(pattern: str) -> re.Pattern[str]:
    parts = []
    for segment in pattern[1:].split("/"):
        if segment == ONE_SEGMENT:
            parts.append(f"[{_PATH_CHARS}]+")
        elif segment == ANY_SEGMENTS:
            parts.append(f"[{_PATH_CHARS}/]*")
        else:
            parts.append(re.escape(segment))
    return re.compile("/" + "/".join(parts))


def istiod_refuses(path: str) -> str | None:
    """Why istiod 1.22 or later refuses this `paths` entry, or None when it accepts it."""
    if not path:
        return "empty value not allowed"
    if "{" not in path and "}" not in path:
        return None
    templated = is_template(path)
    after_any = False
    for segment in path.strip("/").split("/"):
        if segment in (ONE_SEGMENT, ANY_SEGMENTS):
            if after_any:
                return f"invalid path {path}: {{**}} is not the last operator"
            after_any = segment == ANY_SEGMENTS
        elif "{" in segment or "}" in segment:
            return f"invalid path {path}: contains '{{' or '}}' beyond a supported path template"
        elif templated and not _ISTIOD_LITERAL.fullmatch(segment):
            return f"invalid path {path}: segment {segment!r} is not a valid literal"
    return None


@dataclass(slots=True)
class DraftedPaths:
    """`paths` for observed request paths, what is wider than the traffic, and what no path can allow."""

    paths: list[str] = field(default_factory=list)
    wider: list[str] = field(default_factory=list)
    """Entries that allow more than the requests seen, each with why."""
    notes: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    """Observed paths the sidecar refuses whatever the policy (`%00`)."""


def draft_paths(observed: Iterable[str], *, templates: bool = True) -> DraftedPaths:
    """The narrowest `paths` entries istiod accepts that allow every observed path (query strings dropped).

    >>> draft_paths(["/items/1", "/items/2", "/health"]).paths
    ['/health', '/items/{*}']
    >>> draft_paths(["/items/1", "/items/2"], templates=False).paths
    ['/items/*']

    Paths are drafted as the sidecar sees them (`normalize_path`). An id-like segment (number, UUID, hash,
    long token) seen with several values becomes `{*}`, one segment (Istio 1.22 and later); without templates
    the path is cut there into a prefix match, which is wider than the traffic, unless the ids are the first
    segment (the prefix would be `/*`, every path), where the paths are listed one by one. A path ending in `*`
    (which Istio would read as a prefix) is drafted as a suffix match.
    """
    out = DraftedPaths()
    groups: dict[tuple[str | None, ...], set[tuple[str, ...]]] = defaultdict(set)
    for seen in sorted(set(observed)):
        path = normalize_path(seen)
        if path is None:
            out.refused.append(seen)
            continue
        if path != seen.split("?", 1)[0]:
            out.notes.append(f"{seen} is matched as {path} (Istio normalises paths before matching)")
        segments = tuple(path.split("/"))
        groups[tuple(None if ID_SEGMENT.match(s) else s for s in segments)].add(segments)
    entries: set[str] = set()
    for template, members in groups.items():
        varied = [i for i, lit in enumerate(template) if lit is None and len({m[i] for m in members}) > 1]
        paths = sorted("/".join(m) for m in members)
        if not varied:
            entries.update(_exact(p, out) for p in paths)
            continue
        first = min(members)
        if templates:
            pattern = "/".join(ONE_SEGMENT if i in varied else s for i, s in enumerate(first))
            if _templatable(members, varied) and istiod_refuses(pattern) is None:
                entries.add(pattern)
                continue
            entries.update(_exact(p, out) for p in paths)
        elif varied[0] == 1:
            out.notes.append(
                f"ids in the first segment ({', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''}) are "
                "listed one by one: Istio before 1.22 has no one-segment match, and /* would allow every path"
            )
            entries.update(_exact(p, out) for p in paths)
        else:
            prefix = "/".join(first[: varied[0]]) + "/*"
            entries.add(prefix)
            out.wider.append(
                f"{prefix} (for {len(paths)} paths with ids, e.g. {paths[0]}) also allows other and deeper paths: "
                "Istio before 1.22 has no one-segment match ({*})"
            )
    out.paths = sorted(entries)
    return out


def _templatable(members: set[tuple[str, ...]], varied: list[int]) -> bool:
    """Every segment is one the template matcher reads: ids at the varied places, literals elsewhere."""
    for segments in members:
        for i, segment in enumerate(segments[1:], start=1):
            last = i == len(segments) - 1
            if not _SEGMENT.fullmatch(segment) and not (last and segment == "" and i not in varied):
                return False
    return True


def _exact(path: str, out: DraftedPaths) -> str:
    """The entry that matches exactly this normalised path: itself, or a suffix match if it ends in `*`."""
    if not path.endswith("*"):
        return path
    out.wider.append(
        f"*{path} (observed {path}: a trailing * would be a prefix match, so it is drafted as a suffix match, "
        f"which also allows other paths ending in {path})"
    )
    return "*" + path
