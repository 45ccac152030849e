"""zarr stores on object storage (``s3://``, ``gs://``, ``az://``, ``file://`` URLs, through fsspec): the
filesystem of a URL (and the clear error when its fsspec package is missing), the options zarr opens it with,
and turning a failure the user can fix (unreachable endpoint, missing bucket, refused credentials) into one
:class:`~mimprobe.errors.UserError`. Endpoint and credentials come from the environment as s3fs/botocore read
them (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL_S3``, fsspec's ``FSSPEC_S3_ENDPOINT_URL``, ``AWS_MAX_ATTEMPTS``).
"""

from __future__ import annotations

from mimprobe.cache_store.backend import is_url
from mimprobe.errors import UserError, first_line

EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure"}
_PACKAGES = {"s3": "s3fs", "gcs": "gcsfs", "azure": "adlfs"}


def storage_error(path: str, e: BaseException, writing: bool = False) -> UserError | None:
    """A one-line :class:`UserError` for a failure of a remote store that the user can fix (unreachable
    endpoint, missing bucket, refused credentials), else None (then it is a bug and keeps its traceback).
    ``writing``: it happened while chunks were being written (they are kept: re-run to resume)."""
    if not is_url(path) or path.startswith("file://"):
        return None
    kind = None
    try:
        import botocore.exceptions as bx

        if isinstance(e, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError)):
            kind = "cannot reach the endpoint"
        elif isinstance(e, bx.NoCredentialsError):
            kind = "no credentials"
        elif isinstance(e, bx.BotoCoreError):
            kind = "object store error"
    except ImportError:
        pass
    if kind is None:
        if isinstance(e, FileNotFoundError):
            if "bucket" not in str(e).lower():
                return None  # a missing object: the caller says what it means
            kind = "no such bucket"
        elif isinstance(e, PermissionError):
            kind = "access refused"
        elif isinstance(e, (ConnectionError, TimeoutError)):
            kind = "cannot reach the endpoint"
        elif isinstance(e, OSError):
            kind = "object store error"
    if kind is None:
        return None
    msg = first_line(e)
    after = "; finished chunks are kept: re-run the same command to resume" if writing else ""
    return UserError(f"{path}: {kind} ({msg}); check the bucket name, the endpoint (AWS_ENDPOINT_URL) and the "
                     f"credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE){after}")


def remote_call(path: str, what):
    """Run ``what()`` on a remote store; turn a user-fixable storage failure into one line."""
    try:
        return what()
    except UserError:
        raise
    except Exception as e:
        err = storage_error(path, e)
        if err is None:
            raise
        raise err from None


def storage_options(path: str) -> dict | None:
    """fsspec options for a URL: the local filesystem must create chunk directories itself."""
    if not is_url(path):
        return None
    return {"auto_mkdir": True} if path.startswith("file://") else {}


def url_fs(path: str):
    """(filesystem, path inside it) for a URL; a clear error when its fsspec backend is missing."""
    import fsspec

    try:
        fs, p = fsspec.core.url_to_fs(path, **(storage_options(path) or {}))
    except (ImportError, ValueError) as e:
        scheme = path.split("://", 1)[0]
        if scheme in EXTRAS:
            extra = EXTRAS[scheme]
            raise UserError(f"{path}: {scheme}:// stores need {_PACKAGES[extra]}: pip install 'mimprobe[{extra}]'"
                            if extra == "s3" else
                            f"{path}: {scheme}:// stores need {_PACKAGES[extra]}: pip install {_PACKAGES[extra]}") from None
        raise UserError(
            f"{path}: no filesystem for '{scheme}://' ({e}); install its fsspec backend (e.g. s3fs, gcsfs)"
        ) from None
    fs.invalidate_cache()  # fsspec caches instances and listings: another process may have written since
    return fs, p
