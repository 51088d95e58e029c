"""Keeping secrets out of messages, reports and logs.

Adapter URIs come from tenants' manifests and may be pre-signed URLs or carry tokens in their
query string; error messages quote URIs. :func:`redact` masks the secret parts before a message
is logged or written to a report. :func:`quiet_wire_logs` keeps the HTTP libraries' DEBUG
logging (which prints request headers, session tokens included) off even when the tool itself
logs at DEBUG.
"""

from __future__ import annotations

import logging
import os
import re
import sys

#: Query parameters that carry signatures, credentials or tokens (S3, GCS, Azure SAS, generic).
_SECRET_PARAMS = re.compile(
    r"(?i)([?&;](?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|"
    r"awsaccesskeyid|x-goog-signature|x-goog-credential|sig|token|access_token|"
    r"api_key|apikey|key)=)[^&;\s'\"<>]*"
)
#: ``scheme://user:password@host``.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s:@'\"<>]+:[^/\s@'\"<>]*@")
#: Environment variables whose values must never be printed.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "HF_TOKEN",
              "HUGGING_FACE_HUB_TOKEN", "RAY_AUTH_TOKEN")
#: Loggers of HTTP clients that print request headers at DEBUG.
WIRE_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "huggingface_hub.utils._http",
                "httpx", "httpcore")

MASK = "REDACTED"


def redact(text: str | None) -> str | None:
    """``text`` with signed-URL parameters, URL passwords and secret env values masked."""
    if not text:
        return text
    text = _SECRET_PARAMS.sub(rf"\1{MASK}", text)
    text = _USERINFO.sub(rf"\1{MASK}@", text)
    for var in SECRET_ENV:
        value = os.environ.get(var)
        if value and len(value) >= 8 and value in text:
            text = text.replace(value, MASK)
    return text


def quiet_wire_logs(min_level: int = logging.INFO) -> None:
    """Keep the HTTP client libraries' loggers at ``min_level`` or above."""
    for name in WIRE_LOGGERS:
        lg = logging.getLogger(name)
        if lg.getEffectiveLevel() < min_level:
            lg.setLevel(min_level)


def configure_logging(level: str) -> None:
    """Logging of the entry points (CLI, nightly job): ``level`` by name, to stderr, with the
    HTTP libraries kept quiet (their DEBUG output prints request headers, tokens included;
    their INFO lines, e.g. botocore's "Found credentials in environment variables" for every
    client made, only with ``-v``)."""
    numeric = getattr(logging, level)
    logging.basicConfig(level=numeric,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    quiet_wire_logs(logging.INFO if numeric < logging.INFO else logging.WARNING)


__all__ = ["MASK", "SECRET_ENV", "configure_logging", "quiet_wire_logs", "redact"]
