"""Filesystems from URIs: the one place that turns a local path, `s3://bucket/prefix` or another
fsspec URI, plus `storage_options` and the standard `AWS_*` environment variables, into a pyarrow
filesystem. Shard readers and writers use it now; checkpoint and export writers reuse it.

S3 `storage_options` (all optional; explicit options win over the environment):

    endpoint_url       e.g. "http://127.0.0.1:9000" (MinIO, Ceph, moto); env AWS_ENDPOINT_URL_S3,
                       then AWS_ENDPOINT_URL
    region             env AWS_REGION, then AWS_DEFAULT_REGION; else looked up from the bucket
                       (AWS) or "us-east-1" (custom endpoint)
    anonymous          true for public buckets: send unsigned requests, need no credentials
    access_key_id      with secret_access_key (and session_token): explicit credentials; otherwise
    secret_access_key  the standard chain is used on every node: AWS_ACCESS_KEY_ID /
    session_token      AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE, ~/.aws files,
                       web identity, container and instance roles
    connect_timeout    seconds to wait for a TCP connection (default 10)
    request_timeout    seconds to wait for a response (default: the AWS SDK's)

Other schemes (gs://, az://, ...) go through fsspec with `storage_options` passed unchanged to
the fsspec filesystem; the matching fsspec package must be installed.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from raydsnas.checks import check_known
from raydsnas.data.errors import (
    AccessDeniedError,
    EndpointUnreachableError,
    MissingCredentialsError,
    StorageError,
    StorageOptionsError,
)

S3_OPTION_KEYS = (
    "endpoint_url",
    "region",
    "anonymous",
    "access_key_id",
    "secret_access_key",
    "session_token",
    "connect_timeout",
    "request_timeout",
)
# Credentials under the names pyarrow, s3fs and fsspec give them: never in a config file
# (raydsnas.config refuses them there), and redacted wherever options are shown.
CREDENTIAL_KEYS = ("access_key_id", "secret_access_key", "session_token", "key", "secret",
                   "token", "password")
DEFAULT_CONNECT_TIMEOUT_S = 10.0
# How pyarrow's and fsspec's OSErrors say that the store, not the file, failed.
UNREACHABLE_MARKERS = ("NETWORK_CONNECTION", "curlCode", "Could not connect", "Connection refused")
ACCESS_DENIED_MARKERS = (
    "ACCESS_DENIED",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "response code 403",
    "Forbidden",
)
STORE_FAILURE_MARKERS = (*UNREACHABLE_MARKERS, *ACCESS_DENIED_MARKERS, "AWS Error")


def redact_storage_options(storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of `storage_options` fit for logs and reprs: credentials replaced by '***'."""
    return {
        key: "***" if key in CREDENTIAL_KEYS and value else value
        for key, value in (storage_options or {}).items()
    }


def is_local_uri(uri: str) -> bool:
    """True for plain paths and file:// URIs."""
    return urlsplit(uri).scheme in ("", "file")


def join_path(root: str, *parts: str) -> str:
    """Join filesystem paths as returned by `resolve_filesystem` (always '/'-separated)."""
    return posixpath.join(root, *parts)


def s3_endpoint_url(storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The S3 endpoint in force: the option, else AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL.

    pyarrow's S3 client does not read these variables itself, so we do it here for every reader
    and writer.
    """
    options = storage_options or {}
    return (
        options.get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or None
    )


def resolve_filesystem(
    uri: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    check_credentials: bool = True,
) -> tuple[pafs.FileSystem, str]:
    """Return `(filesystem, path)` for `uri`: a pyarrow filesystem and the path inside it.

    Local paths (and file:// URIs) give a `LocalFileSystem` and an absolute path; `s3://` gives a
    pyarrow `S3FileSystem` configured from `storage_options` and the AWS environment variables
    (see the module docstring); other schemes give an fsspec filesystem wrapped for pyarrow.
    With `check_credentials`, an S3 URI that is not anonymous and finds no credentials raises
    `MissingCredentialsError` here instead of sending unsigned requests later.
    The returned filesystem pickles without secrets unless they were given in `storage_options`.
    """
    if not isinstance(uri, str) or not uri:
        raise StorageOptionsError(f"storage URI {uri!r}: must be a non-empty string")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("", "file"):
        if storage_options:
            raise StorageOptionsError(
                f"storage_options {sorted(storage_options)} given for the local path {uri!r}; "
                "local paths take no storage_options"
            )
        local_path = parts.path if scheme == "file" else uri
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(local_path))
    if scheme in ("s3", "s3a"):
        path = (parts.netloc + parts.path).rstrip("/")
        if not parts.netloc:
            raise StorageOptionsError(f"storage URI {uri!r}: no bucket name after s3://")
        return _s3_filesystem(uri, parts.netloc, storage_options or {}, check_credentials), path
    return _fsspec_filesystem(uri, storage_options or {})


def _s3_filesystem(
    uri: str, bucket: str, options: Mapping[str, Any], check_credentials: bool
) -> pafs.S3FileSystem:
    check_known(f"storage_options for {uri}", options, S3_OPTION_KEYS, StorageOptionsError)
    anonymous = options.get("anonymous", False)
    if not isinstance(anonymous, bool):
        raise StorageOptionsError(
            f"storage_options.anonymous = {anonymous!r} for {uri}: must be true or false"
        )
    access_key = options.get("access_key_id")
    secret_key = options.get("secret_access_key")
    if bool(access_key) != bool(secret_key):
        raise StorageOptionsError(
            f"storage_options for {uri}: access_key_id and secret_access_key go together; "
            "give both or neither"
        )
    kwargs: dict[str, Any] = {
        "anonymous": anonymous,
        "connect_timeout": _positive_seconds(
            options, "connect_timeout", uri, DEFAULT_CONNECT_TIMEOUT_S
        ),
    }
    if "request_timeout" in options:
        kwargs["request_timeout"] = _positive_seconds(options, "request_timeout", uri, None)
    if access_key:
        kwargs.update(access_key=access_key, secret_key=secret_key)
        if options.get("session_token"):
            kwargs["session_token"] = options["session_token"]

    endpoint = s3_endpoint_url(options)
    if endpoint:
        endpoint_parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        if endpoint_parts.scheme not in ("http", "https") or not endpoint_parts.netloc:
            raise StorageOptionsError(
                f"S3 endpoint {endpoint!r} for {uri}: must look like http(s)://host[:port]"
            )
        kwargs.update(endpoint_override=endpoint_parts.netloc, scheme=endpoint_parts.scheme)

    region = (
        options.get("region")
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
    )
    if not region:
        region = "us-east-1" if endpoint else _bucket_region(bucket)
    kwargs["region"] = region

    if check_credentials and not anonymous and not access_key:
        _require_default_credentials(uri)
    return pafs.S3FileSystem(**kwargs)


def _positive_seconds(
    options: Mapping[str, Any], key: str, uri: str, default: float | None
) -> float | None:
    value = options.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise StorageOptionsError(
            f"storage_options.{key} = {value!r} for {uri}: must be a positive number of seconds"
        )
    return float(value)


def _bucket_region(bucket: str) -> str:
    # Only reached for AWS itself (no custom endpoint): a wrong region makes every request fail.
    try:
        return pafs.resolve_s3_region(bucket)
    except OSError:
        return "us-east-1"


def _require_default_credentials(uri: str) -> None:
    """Fail early when the standard AWS chain finds nothing: unsigned requests would otherwise be
    sent and fail (or hang on instance-metadata lookups) far away in a Ray task."""
    try:
        import botocore.session
        from botocore.exceptions import BotoCoreError
    except ImportError:  # botocore comes with s3fs; without it we cannot look, so do not block
        return
    session = botocore.session.Session(profile=os.environ.get("AWS_PROFILE") or None)
    try:
        credentials = session.get_credentials()
    except (BotoCoreError, OSError, ValueError) as error:  # broken profile file, unknown profile
        raise MissingCredentialsError(
            f"cannot load AWS credentials for {uri}: {type(error).__name__}: {error}"
        ) from None
    if credentials is None:
        raise MissingCredentialsError(
            # Only ways a job config accepts: it rejects credentials in storage options.
            f"no AWS credentials found for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE) in the environment of every node, or use an instance/container "
            "role; for a public bucket set storage_options anonymous: true"
        )


def _fsspec_filesystem(uri: str, options: Mapping[str, Any]) -> tuple[pafs.FileSystem, str]:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri, **options)
    except (ImportError, ValueError, TypeError) as error:
        raise StorageOptionsError(f"cannot open {uri} through fsspec: {error}") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path.rstrip("/")


@contextlib.contextmanager
def storage_errors(uri: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Turn the OSErrors of pyarrow/fsspec filesystems into `StorageError`s naming `uri` and, for
    S3, the endpoint: unreachable endpoint, access denied, anything else."""
    try:
        yield
    except StorageError:
        raise
    except OSError as error:
        message = str(error)
        where = uri
        endpoint = (
            s3_endpoint_url(storage_options) if urlsplit(uri).scheme.startswith("s3") else None
        )
        if endpoint:
            where = f"{uri} (endpoint {endpoint})"
        if any(marker in message for marker in UNREACHABLE_MARKERS):
            raise EndpointUnreachableError(
                f"cannot reach the object store for {where}: {message}. Check "
                "storage_options.endpoint_url / AWS_ENDPOINT_URL and that the server is up."
            ) from None
        if any(marker in message for marker in ACCESS_DENIED_MARKERS):
            raise AccessDeniedError(
                f"access denied to {where}: {message}. Check the credentials "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or storage_options) and the bucket "
                "policy."
            ) from None
        raise StorageError(f"storage error on {where}: {message}") from error


def is_store_failure(message: str) -> bool:
    """True when an OSError's message says the object store failed (unreachable, refused, an
    AWS error), as opposed to the file's content being unreadable."""
    return any(marker in message for marker in STORE_FAILURE_MARKERS)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    """The whole content of one file."""
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file, or the complete new one, never
    a part. Local files: write a temporary sibling, then rename over. Object stores: one upload,
    which the store publishes only once it is complete."""
    if isinstance(fs, pafs.LocalFileSystem):
        directory = posixpath.dirname(path)
        fs.create_dir(directory, recursive=True)
        temporary = join_path(directory, f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex}")
        try:
            with fs.open_output_stream(temporary) as stream:
                stream.write(data)
            fs.move(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                fs.delete_file(temporary)
            raise
    else:
        with fs.open_output_stream(path) as stream:
            stream.write(data)
