"""Shared fixtures: a real S3-compatible server on loopback (moto's server mode) with test
credentials in the environment, and one local Ray instance for the whole session.

Order matters: `ray_local` depends on `aws_test_credentials`, so Ray's worker processes inherit
the test credentials from the environment exactly as cluster nodes get theirs from roles or env.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs
import pytest

TEST_ACCESS_KEY_ID = "raydsnas-test-access-key"
# Distinctive, so that a test can grep for it in every object, file and log line.
TEST_SECRET_ACCESS_KEY = f"raydsnas-test-secret-{uuid.uuid4().hex}"
TEST_REGION = "us-east-1"


@pytest.fixture(scope="session")
def aws_test_credentials() -> Iterator[dict[str, str]]:
    """Fake AWS credentials in os.environ for the session (restored afterwards). Instance
    metadata lookups are off, so a missing-credential test cannot wait on them."""
    values = {
        "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": TEST_REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    yield values
    for name, old in saved.items():
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@dataclass
class S3Server:
    """A moto S3 server on 127.0.0.1; `endpoint_url` goes into storage_options."""

    endpoint_url: str
    buckets: list[str] = field(default_factory=list)

    @property
    def storage_options(self) -> dict[str, str]:
        return {"endpoint_url": self.endpoint_url}

    def filesystem(self) -> pafs.S3FileSystem:
        """A test-side client with explicit credentials, for arranging and inspecting objects."""
        host = self.endpoint_url.split("://", 1)[1]
        return pafs.S3FileSystem(
            endpoint_override=host,
            scheme="http",
            region=TEST_REGION,
            access_key=TEST_ACCESS_KEY_ID,
            secret_key=TEST_SECRET_ACCESS_KEY,
            allow_bucket_creation=True,
        )

    def make_bucket(self, prefix: str = "test") -> str:
        """Create a fresh bucket and return its name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.filesystem().create_dir(name)
        self.buckets.append(name)
        return name

    def object_contents(self, bucket: str) -> dict[str, bytes]:
        """Every object in `bucket`, key -> bytes."""
        fs = self.filesystem()
        infos = fs.get_file_info(pafs.FileSelector(bucket, recursive=True))
        contents = {}
        for info in infos:
            if info.type == pafs.FileType.File:
                with fs.open_input_stream(info.path) as stream:
                    contents[info.path] = stream.read()
        return contents


@pytest.fixture(scope="session")
def s3_server(aws_test_credentials) -> Iterator[S3Server]:
    """A real S3-compatible server (moto server mode) on a free loopback port."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield S3Server(endpoint_url=f"http://{host}:{port}")
    server.stop()


@pytest.fixture(scope="module")
def ray_local(aws_test_credentials, tmp_path_factory) -> Iterator[Path]:
    """A local Ray with 2 CPUs for one test module; yields its session log folder.

    Module scope, so that no in-process Ray is alive while another module's tests start their
    own clusters in subprocesses: with two Ray instances on one machine, Ray Train's
    placement-group cleaner cannot resolve which one to ask, and a finished trial's resources
    leak (then the next trial waits forever).

    The dashboard is off to save the 2 cores; a Tune/ASHA test needs its own Ray with the
    dashboard on (see shared/RAY_NOTES.md)."""
    import ray
    import ray.data

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",  # our own instance, even when a `ray start` cluster runs on the machine
        num_cpus=2,
        include_dashboard=False,
        logging_level="WARNING",
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
        # One machine: keep torch.distributed's gloo on loopback (see shared/RAY_NOTES.md).
        runtime_env={"env_vars": {"GLOO_SOCKET_IFNAME": "lo"}},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    session_dir = Path(ray._private.worker._global_node.get_session_dir_path())
    yield session_dir
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny networks: one intra-op thread for the module (two contend badly on a shared 2-core
    machine). Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
