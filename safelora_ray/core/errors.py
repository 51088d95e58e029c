"""Exception types.

Every error raised for bad input names what is wrong and where (the URI, file, tensor,
module or adapter), so that an operator reading one line of a fleet report can act on it.
"""

from __future__ import annotations


class SafeLoraError(Exception):
    """Base class of all errors raised by safelora-ray."""


class StorageError(SafeLoraError):
    """A storage operation failed (missing object, denied access, unsupported URI)."""


class NotFoundError(StorageError):
    """The object or file does not exist."""


class ChangedError(StorageError):
    """The object is no longer the version the caller listed (rewritten since)."""


class SafetensorsFormatError(SafeLoraError):
    """A safetensors file is malformed; the message names the file and, where known, the tensor."""


class CheckpointError(SafeLoraError):
    """A checkpoint (or a base/aligned pair) cannot be used: missing, mismatched or bad tensors."""


class AlignmentSetError(SafeLoraError):
    """An alignment set is missing, incomplete (interrupted build) or inconsistent."""


class AdapterError(SafeLoraError):
    """A LoRA adapter cannot be sanitized; the message names the adapter and the reason."""


class ClusterError(SafeLoraError):
    """The Ray cluster cannot be reached, or lost the resources a run needs."""


class Interrupted(SafeLoraError):
    """The run was interrupted (Ctrl-C); the task stopped at a safe point."""


class ConfigError(SafeLoraError, ValueError):
    """Invalid user configuration (flags, config files, parameters)."""


class LeaseHeldError(SafeLoraError):
    """Another live run holds the lease on an output (the message names it): exit 4."""


def system_error_line(exc: BaseException) -> str | None:
    """One line for a file system or S3 error that reached the command line unnamed (an
    ``OSError``, a botocore or boto3 error, also inside a Ray task error); None for anything
    else, which is a programming error and keeps its traceback."""
    import sys

    ray_exc = sys.modules.get("ray.exceptions")
    if ray_exc is not None and isinstance(exc, ray_exc.RayTaskError) and exc.cause is not None:
        exc = exc.cause
    if isinstance(exc, OSError):
        where = " → ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        what = exc.strerror or str(exc) or type(exc).__name__
        return f"{what}: {where}" if where else f"{type(exc).__name__}: {what}"
    boto = sys.modules.get("botocore.exceptions")
    if boto is not None and isinstance(exc, boto.ClientError):
        err = exc.response.get("Error", {})
        bucket = err.get("BucketName")
        return (f"S3 {exc.operation_name} failed{f' on bucket {bucket}' if bucket else ''}: "
                f"{err.get('Code', '?')} {err.get('Message', '')}".strip())
    boto3_exc = sys.modules.get("boto3.exceptions")
    if ((boto is not None and isinstance(exc, boto.BotoCoreError))
            or (boto3_exc is not None and isinstance(exc, boto3_exc.Boto3Error))):
        return f"S3 request failed: {type(exc).__name__}: {exc}".replace("\n", " ")
    return None
