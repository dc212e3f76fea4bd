"""Where a dataset lives: a `--dataset` value resolved into a pyarrow filesystem and a root path on it.

A dataset is a local folder (`flowpipe-data`, `/var/lib/flowpipe`) or an object-store URL. For S3 and
S3-compatible stores (MinIO, Ceph RGW, R2, ...) the URL is `s3://bucket/prefix`, and the connection comes from
the usual AWS settings, with flowpipe's flags first:

| setting      | flag / environment (first one set wins)                                               |
|--------------|---------------------------------------------------------------------------------------|
| endpoint     | `--s3-endpoint`, `FLOWPIPE_S3_ENDPOINT`, `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`      |
| region       | `--s3-region`, `FLOWPIPE_S3_REGION`, `AWS_REGION`, `AWS_DEFAULT_REGION`                 |
| credentials  | `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`), else the AWS SDK |
|              | chain: `~/.aws/credentials` and `AWS_PROFILE`, web identity (EKS IRSA), EC2 metadata   |

An endpoint is a URL (`http://minio:9000`, `https://s3.eu-central-1.amazonaws.com`); without a scheme it is
https. With an endpoint, buckets are addressed by path (`http://minio:9000/bucket/key`), which every
S3-compatible server accepts. Other pyarrow URLs (`gs://`, `hdfs://`, `file://`) are handed to
`pyarrow.fs.FileSystem.from_uri` as they are.

How a part file reaches an object store (see `flowpipe.dataset.layout`): objects have no rename, and pyarrow's S3
output stream uploads the object when it is closed (a single PUT, or a multipart upload completed on close: until
then no object exists under its key). A process killed while writing therefore leaves no object at all, at most
an incomplete multipart upload that the store never lists (a bucket lifecycle rule
`AbortIncompleteMultipartUpload` reclaims its space). But an *exception* in the writing process closes the
stream on the way out, which completes the upload with whatever was written. So a part file is only ever sent to
its final key whole: a small one (up to `dataset.SINGLE_PUT_BYTES`) is kept in memory until it is complete and
then sent in one PUT; a larger one is first written under a hidden temporary key (`.part-...parquet.tmp`, which
every reader skips), then copied server-side to its final key (one atomic CopyObject: the final object appears
complete or not at all), and the temporary key is deleted. flowpipe writes no folder-marker objects (pyarrow
re-creates a folder's marker when it deletes an object in it). `tests/test_storage_s3.py` and
`tests/test_writers.py` check these cases against a local S3 server.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from flowpipe.errors import ConfigError

OBJECT_STORE_SCHEMES = ("s3",)
ENDPOINT_VARIABLES = ("FLOWPIPE_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
REGION_VARIABLES = ("FLOWPIPE_S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION")
DEFAULT_REGION = "us-east-1"
"""Region used with an explicit endpoint when none is set (S3-compatible servers mostly ignore it)."""


@dataclass(frozen=True, slots=True)
class S3Options:
    """How to reach an S3 store: endpoint URL and region (None: from the environment)."""

    endpoint: str | None = None
    region: str | None = None


_flag_options = S3Options()


def set_s3_options(endpoint: str | None = None, region: str | None = None) -> None:
    """Set the endpoint and region given as command-line flags (they win over the environment).

    The CLI calls this for every command that takes `--dataset`; None leaves the environment in charge.
    """
    global _flag_options
    _flag_options = S3Options(endpoint=endpoint or None, region=region or None)


def flag_options() -> S3Options:
    """The endpoint and region set by `set_s3_options` (the command-line flags)."""
    return _flag_options


def s3_options(environ: Mapping[str, str] | None = None) -> S3Options:
    """The endpoint and region in effect: the flags, else the first environment variable set."""
    env = os.environ if environ is None else environ
    endpoint = _flag_options.endpoint or _first(env, ENDPOINT_VARIABLES)
    region = _flag_options.region or _first(env, REGION_VARIABLES)
    return S3Options(endpoint=endpoint, region=region)


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return value
    return None


def is_url(dataset: str) -> bool:
    """True when `dataset` is a URL (`scheme://...`) rather than a local path."""
    return "://" in dataset


def s3_filesystem(
    options: S3Options | None = None, environ: Mapping[str, str] | None = None
) -> pafs.S3FileSystem:
    """A pyarrow `S3FileSystem` for `options` (default: flags and environment); credentials as documented."""
    env = os.environ if environ is None else environ
    options = options or s3_options(env)
    # allow_delayed_open: an object smaller than one upload part is sent as one PUT on close, not as a
    # multipart upload of three requests (what is atomic stays atomic: nothing exists before the close)
    kwargs: dict[str, object] = {"allow_delayed_open": True}
    if options.endpoint:
        parts = urlsplit(options.endpoint if "://" in options.endpoint else f"https://{options.endpoint}")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(
                f"S3 endpoint {options.endpoint!r} is not a URL like http://host:9000 or https://host"
            )
        kwargs["endpoint_override"] = parts.netloc
        kwargs["scheme"] = parts.scheme
    region = options.region or (DEFAULT_REGION if options.endpoint else None)
    if region:
        kwargs["region"] = region
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs["access_key"] = key
        kwargs["secret_key"] = secret
        if env.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = env["AWS_SESSION_TOKEN"]
    try:
        return pafs.S3FileSystem(**kwargs)
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise ConfigError(f"cannot set up S3 access ({exc})") from exc


def resolve_dataset(dataset: str, environ: Mapping[str, str] | None = None) -> tuple[pafs.FileSystem, str]:
    """The filesystem and root path of a dataset named by a local path or a URL.

    >>> resolve_dataset("s3://flows/prod")[1]              # doctest: +SKIP
    'flows/prod'

    Raises `ConfigError` for a URL that names no bucket or that pyarrow cannot open.
    """
    if not is_url(dataset):
        return pafs.LocalFileSystem(), os.path.abspath(dataset)
    parts = urlsplit(dataset)
    scheme = parts.scheme.lower()
    if scheme in OBJECT_STORE_SCHEMES and not parts.query:
        bucket, path = parts.netloc, parts.path.strip("/")
        if not bucket:
            raise ConfigError(f"dataset {dataset} names no bucket (expected s3://bucket/prefix)")
        root = f"{bucket}/{path}" if path else bucket
        return s3_filesystem(environ=environ), root
    try:
        filesystem, path = pafs.FileSystem.from_uri(dataset)
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise ConfigError(f"cannot open dataset {dataset}: {exc}") from exc
    return filesystem, path.rstrip("/") or "/"


def is_object_store(filesystem: pafs.FileSystem) -> bool:
    """True for filesystems without rename or folders (S3 and the like), False for local and HDFS-like ones."""
    return filesystem.type_name in ("s3", "gcs")
