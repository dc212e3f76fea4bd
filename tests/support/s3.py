"""A local S3-compatible server (moto's standalone server on 127.0.0.1, in its own process) as a fixture."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pyarrow.fs as pafs
import pytest

MOTO = textwrap.dedent(
    """
    import sys, time
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    print(server.get_host_and_port()[1], flush=True)
    sys.stdin.read()  # until the test closes our stdin
    server.stop()
    """
)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 in a child process (pyarrow's blocking calls never wait on its GIL)."""
    process = subprocess.Popen(
        [sys.executable, "-c", MOTO], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert process.stdout is not None and process.stdin is not None
    port = int(process.stdout.readline())
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            patch.delenv(name, raising=False)
        patch.setenv("AWS_ACCESS_KEY_ID", "flowpipe-test")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "flowpipe-test")
        patch.setenv("AWS_REGION", "us-east-1")
        patch.setenv("FLOWPIPE_S3_ENDPOINT", f"http://127.0.0.1:{port}")
        yield f"http://127.0.0.1:{port}"
    process.stdin.close()
    process.wait(10)


def fresh_bucket(request: pytest.FixtureRequest, prefix: str = "w") -> str:
    """`s3://BUCKET/data` in a new bucket of the local S3 server, named after the test asking for it."""
    name = request.node.name.lower()
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    bucket = f"{prefix}-" + "".join(c if c.isalnum() else "-" for c in name)[:40].strip("-") + "-" + digest
    bucket_filesystem().create_dir(bucket)
    return f"s3://{bucket}/data"


def bucket_filesystem() -> pafs.S3FileSystem:
    """The local S3 server (`FLOWPIPE_S3_ENDPOINT`) as a pyarrow filesystem that may create buckets."""
    endpoint = os.environ["FLOWPIPE_S3_ENDPOINT"].removeprefix("http://")
    return pafs.S3FileSystem(
        endpoint_override=endpoint, scheme="http", region="us-east-1", allow_bucket_creation=True
    )
