"""URL templates of HTTP tools: arguments can never move a call to another resource.

The host is the template's, a path argument is exactly one segment (never empty, a dot segment
or a separator, however encoded), query arguments never replace a parameter the template sets,
and the URL httpx will send is checked against the template before it is sent.

A template may name environment variables as ``${NAME}`` (the parts that differ between
deployments, such as an API's base URL): :func:`expand_variables` fills them in once, when the
tools service builds the tool, before the template is parsed and checked.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Mapping
from functools import lru_cache
from typing import Any
from urllib.parse import quote, unquote, urlencode

import httpx

from contracts.definitions_base import DefinitionError
from contracts.errors import Forbidden, InvalidRequest
from services.toolkit.arguments import canonical_key

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
TENANT = "tenant_id"


class UnsafeUrlArgument(InvalidRequest):
    """An argument that would make the URL name another resource than its template: a path
    segment that is empty, a dot segment or holds a separator (in any encoding), or a query
    argument named like a parameter the template sets. The tool is not called."""


class UnsetUrlVariable(DefinitionError):
    """An HTTP tool's URL names an environment variable (``${NAME}``) that is not set, or is empty:
    the tools service does not start (as for any other broken definition)."""


class UrlOutsideTemplate(Forbidden):
    """The URL about to be sent has left its template's scheme, host, port, path prefix or tenant
    segment: the last check, for anything the argument checks might miss. Nothing is sent."""


# Characters that end or split a path segment for some server: the separators, and the slash
# look-alikes that NFKC leaves alone but "best fit" decoders (IIS, some proxies) turn into one.
_SEPARATORS = frozenset("/\\?#\u2215\u2044\u29f8\u29f9\u2216")
_ASCII_UNSAFE = re.compile(r"[/\\?#\x00-\x1f\x7f]")
_IIS_ESCAPE = re.compile(r"%u([0-9a-fA-F]{4})")
# How many percent-decodings deep an argument is checked; a value still changing after that is refused.
_DECODINGS = 4


def expand_variables(tool: str, url: str, environ: Mapping[str, str] = os.environ) -> str:
    """``url`` with every ``${NAME}`` replaced by the environment variable ``NAME``.

    Unset or empty is an :class:`UnsetUrlVariable` naming it. A value may not hold ``{`` or
    ``}``: what a variable brings in is never a placeholder an argument would fill."""
    if "${" not in url:
        return url
    if url.count("${") != len(_VARIABLE.findall(url)):
        raise DefinitionError(f"tool {tool!r}: a '${{' in its URL does not start a variable ${{NAME}}")

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        found = environ.get(name, "")
        if not found:
            raise UnsetUrlVariable(
                f"tool {tool!r}: its URL uses ${{{name}}}, and the environment variable {name} is not set"
            )
        if "{" in found or "}" in found:
            raise DefinitionError(
                f"tool {tool!r}: the environment variable {name} holds '{{' or '}}', which a URL may not take from it"
            )
        return found

    return _VARIABLE.sub(value, url)


def path_segment(tool: str, name: str, value: str) -> str:
    """``value`` percent-encoded as exactly one path segment (``safe=""``).

    Refused if the value, or any decoding of it a lenient server or proxy might apply (repeated
    percent-decoding, IIS ``%uXXXX``, NFKC so that fullwidth and leader dots are dots), is empty,
    only dots (and spaces, before any ``;`` path parameter), or holds a separator, a control or an
    invisible character, or is not UTF-8 once decoded (overlong forms of ``.`` and ``/``).
    Other non-ASCII text is allowed and sent as percent-encoded UTF-8.
    """
    text = value
    for _ in range(_DECODINGS + 1):
        reason = _unsafe_segment(text)
        if reason is not None:
            raise UnsafeUrlArgument(
                f"tool {tool!r}: the argument {name!r} {reason}, so it cannot be a URL path segment"
            )
        if text.isascii() and "%" not in text:
            return quote(value, safe="")  # nothing left to decode: every reading of it was checked
        try:
            decoded = unicodedata.normalize("NFKC", unquote(_IIS_ESCAPE.sub(_iis_char, text), errors="strict"))
        except UnicodeDecodeError:
            raise UnsafeUrlArgument(f"tool {tool!r}: the argument {name!r} is not UTF-8 once percent-decoded") from None
        if decoded == text:
            return quote(value, safe="")
        text = decoded
    raise UnsafeUrlArgument(f"tool {tool!r}: the argument {name!r} is percent-encoded more than {_DECODINGS} times")


def _iis_char(match: re.Match[str]) -> str:
    return chr(int(match.group(1), 16))


def _unsafe_segment(text: str) -> str | None:
    head = text.split(";", 1)[0]  # Tomcat and others drop ";params" before resolving "..;x"
    if all(char == "." or char.isspace() for char in head):
        return "is empty or only dots"
    if text.isascii():
        return "holds a separator or a control character" if _ASCII_UNSAFE.search(text) else None
    for char in text:
        if char in _SEPARATORS or unicodedata.category(char) in ("Cc", "Cf"):
            return "holds a separator, a control or an invisible character"
    return None


class UrlTemplate:
    """A tool's URL template, split once into origin, path segments and query.

    The origin (scheme, user, host, port) may hold ``{tenant_id}`` and nothing else: it never
    comes from arguments. Each path segment is filled with :func:`path_segment`; the query's
    placeholders are percent-encoded (``safe=""``), so they can add no parameter. :meth:`check`
    compares the URL httpx would send (dot segments removed) with the template's.
    """

    def __init__(self, tool: str, origin: str, segments: list[str], query: str) -> None:
        self.tool = tool
        self.origin = origin
        self.segments = segments
        self.query = query
        # Canonical names (any case or separator) of the parameters the template's query sets.
        self.query_keys = frozenset(canonical_key(key) for key in httpx.QueryParams(query))
        self.expected = lru_cache(maxsize=1024)(self._expected)

    @classmethod
    def parse(cls, tool: str, url: str) -> UrlTemplate:
        """Split ``url``; a template whose host, port or query names could come from arguments,
        or that is not absolute http(s), is a :class:`DefinitionError`."""
        scheme, separator, rest = url.partition("://")
        if not separator or scheme.lower() not in ("http", "https"):
            raise DefinitionError(f"tool {tool!r}: the URL must be absolute, http:// or https://")
        if "#" in rest:
            raise DefinitionError(f"tool {tool!r}: the URL may not have a fragment (it is never sent)")
        end = min([index for index in (rest.find("/"), rest.find("?")) if index >= 0], default=len(rest))
        authority, path_and_query = rest[:end], rest[end:]
        if set(_PLACEHOLDER.findall(authority)) - {TENANT}:
            raise DefinitionError(f"tool {tool!r}: the URL's host and port may hold {{tenant_id}} only, no argument")
        path, _, query = path_and_query.partition("?")
        segments = (path or "/").split("/")  # httpx sends an empty path as "/"
        if any(unquote(segment) in (".", "..") for segment in segments):
            raise DefinitionError(f"tool {tool!r}: the URL's path may not contain '.' or '..' segments")
        if any(_PLACEHOLDER.search(key) for key in httpx.QueryParams(query)):
            raise DefinitionError(f"tool {tool!r}: a query parameter's name may not come from an argument")
        template = cls(tool, f"{scheme}://{authority}", segments, query)
        try:
            template.expected("tenant")  # a template httpx cannot read fails at load, not on a call
        except (httpx.InvalidURL, UrlOutsideTemplate) as exc:
            raise DefinitionError(f"tool {tool!r}: the URL is not valid ({exc})") from None
        return template

    def fill(self, tenant: str, arguments: dict[str, Any], *, rest_in_query: bool) -> tuple[httpx.URL, dict[str, Any]]:
        """The checked URL for one call, and the arguments no placeholder took. With
        ``rest_in_query`` (GET, DELETE) those go in the query instead, after the template's own
        parameters (httpx's ``params=`` would replace the template's query, tenant and all)."""
        used: set[str] = set()

        def value(name: str) -> str:
            if name not in arguments:
                raise InvalidRequest(f"tool {self.tool!r} needs the argument {name!r}")
            used.add(name)
            return as_text(arguments[name])

        def in_path(match: re.Match[str]) -> str:
            name = match.group(1)
            return quote(tenant, safe="") if name == TENANT else path_segment(self.tool, name, value(name))

        def in_query(match: re.Match[str]) -> str:
            name = match.group(1)
            return quote(tenant if name == TENANT else value(name), safe="")

        origin = self.origin.replace("{tenant_id}", quote(tenant, safe=""))
        path = "/".join(_PLACEHOLDER.sub(in_path, segment) if "{" in segment else segment for segment in self.segments)
        query = _PLACEHOLDER.sub(in_query, self.query) if "{" in self.query else self.query
        remaining = {name: item for name, item in arguments.items() if name not in used}
        if rest_in_query and remaining:
            for name in remaining:
                # A lenient server would not tell `ORG` from the template's `org={tenant_id}`.
                if canonical_key(name) in self.query_keys:
                    raise UnsafeUrlArgument(
                        f"tool {self.tool!r}: the argument {name[:64]!r} names a query parameter its URL sets"
                    )
            # Encoded as httpx encodes `params=` (urllib's urlencode), appended in one parse.
            extra = urlencode(query_params(remaining), doseq=True)
            query, remaining = (f"{query}&{extra}" if query and extra else query or extra), {}
        try:
            url = httpx.URL(origin + path + ("?" + query if query else ""))
        except httpx.InvalidURL:
            raise UrlOutsideTemplate(f"tool {self.tool!r}: its arguments do not make a valid URL") from None
        self.check(url, tenant)
        return url, remaining

    def _expected(self, tenant: str) -> tuple[tuple[str, str, str, int | None], list[bytes | None]]:
        # The template as httpx reads it for this tenant; None marks a segment an argument fills.
        filled = [segment.replace("{tenant_id}", quote(tenant, safe="")) for segment in self.segments]
        skeleton = httpx.URL(
            self.origin.replace("{tenant_id}", quote(tenant, safe=""))
            + "/".join(_PLACEHOLDER.sub("_", segment) for segment in filled)
        )
        raw = skeleton.raw_path.split(b"/")
        if len(raw) != len(filled):
            raise UrlOutsideTemplate(f"tool {self.tool!r}: httpx reads its URL template with other segments")
        fixed = [None if _PLACEHOLDER.search(segment) else part for segment, part in zip(filled, raw, strict=True)]
        return (skeleton.scheme, skeleton.userinfo.decode(), skeleton.host, skeleton.port), fixed

    def check(self, url: httpx.URL, tenant: str) -> None:
        """Raise :class:`UrlOutsideTemplate` unless ``url`` (what httpx sends) has the template's
        origin and as many path segments, each fixed one (the prefix, the tenant's) unchanged."""
        origin, fixed = self.expected(tenant)
        if (url.scheme, url.userinfo.decode(), url.host, url.port) != origin:
            raise UrlOutsideTemplate(f"tool {self.tool!r}: the URL left its template's scheme, host or port")
        sent = url.raw_path.partition(b"?")[0].split(b"/")
        if len(sent) != len(fixed):
            raise UrlOutsideTemplate(f"tool {self.tool!r}: the URL's path does not have its template's segments")
        for got, want in zip(sent, fixed, strict=True):
            if (got != want) if want is not None else (got in (b"", b".", b"..")):
                raise UrlOutsideTemplate(f"tool {self.tool!r}: the URL's path left its template's prefix or tenant")


def as_text(value: Any) -> str:
    """A scalar as it reads in a URL (``true``, ``3``, ``abc``); anything structured as JSON."""
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def query_params(arguments: dict[str, Any]) -> dict[str, str | list[str]]:
    """Arguments as query parameters; a list of scalars repeats the parameter (``?tag=a&tag=b``)
    and a null is left out (an optional argument not given)."""
    params: dict[str, str | list[str]] = {}
    for key, value in arguments.items():
        if value is None:
            continue
        if isinstance(value, list) and all(not isinstance(item, dict | list) for item in value):
            params[key] = [as_text(item) for item in value]
        else:
            params[key] = as_text(value)
    return params
