"""Storage URIs as text: validation (``check_uri``), splitting and joining, relative object
paths, and where two locations lie relative to each other (outputs never overlap inputs).

Nothing here opens a storage (see :mod:`safelora_ray.storage.registry`).
"""

from __future__ import annotations

import logging
import os
import re

from safelora_ray.core.errors import ConfigError, StorageError

logger = logging.getLogger(__name__)

#: URI schemes this tool reads or writes.
SCHEMES = ("file", "s3", "hf")
_SCHEME_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(/*)(.*)$", re.S)


def check_uri(uri: str, what: str = "URI") -> str:
    """Refuse a location that looks like a URI but is not a valid one; returns ``uri``.

    ``s3:/bucket/x`` or ``s3:bucket/x`` would otherwise be read as a *local* folder named
    ``s3:`` (a catalog that "does not exist", or a run written to ``./s3:/``), so anything
    that starts like a scheme must be a well-formed URI of a known scheme.

    Args:
        uri: A local path or ``scheme://...`` URI.
        what: How to name it in the message (a flag, e.g. ``--out``).

    Raises:
        ConfigError: naming ``what``, the value and, when it is a near-miss, the fix.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise ConfigError(f"{what} is empty")
    if uri != uri.strip():
        raise ConfigError(f"{what} {uri!r} has leading or trailing spaces")
    m = _SCHEME_PREFIX.match(uri)
    if m is None:
        return uri  # a plain path
    scheme, slashes, rest = m.group(1).lower(), m.group(2), m.group(3)
    if scheme == "file" and slashes == "///":
        return uri  # file:///abs/path
    if slashes == "//" and scheme in SCHEMES:
        if scheme == "file":
            raise ConfigError(f"{what} {uri!r} is not a valid file URI: did you mean "
                              f"'file:///{rest}'?")
        if not rest.strip("/"):
            raise ConfigError(f"{what} {uri!r} names no {'bucket' if scheme == 's3' else 'repo'}")
        return uri
    if scheme in SCHEMES:
        fixed = f"{scheme}:///{rest}" if scheme == "file" else f"{scheme}://{rest}"
        raise ConfigError(f"{what} {uri!r} is not a valid URI: did you mean {fixed!r}?")
    if slashes == "//":
        raise ConfigError(f"{what} {uri!r}: unsupported URI scheme {scheme!r} "
                          "(use a local path, s3:// or hf://)")
    raise ConfigError(f"{what} {uri!r} looks like a URI with scheme {scheme!r}, which is not "
                      "supported (use a local path, s3:// or hf://); if it is a local path, "
                      f"write it as ./{uri}")


def location(uri: str) -> tuple[str, str]:
    """Where ``uri`` points, comparably: ``(namespace, path)``.

    Local paths resolve symlinks (two spellings of one directory are one place); S3 is the
    bucket and the key prefix; the Hub is the repo at its revision and a subfolder.
    """
    scheme, rest = split_uri(check_uri(uri))
    if scheme == "file":
        return "file", os.path.realpath(os.path.abspath(os.path.expanduser(rest)))
    bucket_or_repo, _, path = rest.strip("/").partition("/")
    if scheme == "hf":  # org/name[@rev]/subdir
        org, _, after = rest.strip("/").partition("/")
        name, _, path = after.partition("/")
        bucket_or_repo = f"{org}/{name if '@' in name else name + '@main'}"
    return f"{scheme}:{bucket_or_repo}", "/".join(p for p in path.split("/") if p)


def overlap(a: str, b: str) -> str | None:
    """How location ``a`` relates to ``b``: ``"same"``, ``"inside"`` (a lies in b),
    ``"contains"`` (b lies in a), or None when they are apart."""
    (na, pa), (nb, pb) = location(a), location(b)
    if na != nb:
        return None
    sep = os.sep if na == "file" else "/"
    if pa == pb:
        return "same"
    if not pb or pa.startswith(pb.rstrip(sep) + sep):
        return "inside"
    if not pa or pb.startswith(pa.rstrip(sep) + sep):
        return "contains"
    return None


def refuse_overlap(out: str, out_flag: str, other: str, other_flag: str, why: str) -> None:
    """Raise a :class:`ConfigError` when the output location ``out`` equals, contains or lies
    inside the input ``other`` (inputs are never written, and outputs never become inputs).

    Args:
        out: The output URI.
        out_flag: Its flag, for the message (``--out``).
        other: An input URI.
        other_flag: Its flag (``--adapters``).
        why: What would go wrong, for the message.
    """
    rel = overlap(out, other)
    if rel is None:
        return
    how = {"same": "is the same place as", "inside": "lies inside",
           "contains": "contains"}[rel]
    raise ConfigError(f"{out_flag} {out} {how} {other_flag} {other}: {why}; choose an "
                      f"{out_flag} apart from it")


def split_uri(uri: str) -> tuple[str, str]:
    """Split ``uri`` into ``(scheme, rest)``; plain paths have scheme ``file``."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return scheme.lower(), rest
    return "file", uri


def join_uri(uri: str, path: str) -> str:
    """``uri`` joined with a relative ``path`` using ``/``."""
    if not path:
        return uri
    return uri.rstrip("/") + "/" + path.lstrip("/")


def normalize_relpath(path: str) -> str:
    """Validate a relative object path: no absolute paths, no ``..``, no empty segments."""
    if path in ("", "."):
        return ""
    p = path.replace("\\", "/")
    if p.startswith("/") or any(seg in ("..", "") for seg in p.split("/")):
        raise StorageError(f"invalid relative path {path!r}")
    return p
