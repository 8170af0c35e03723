"""The Dockerfile, built and run for real with buildah (no Docker engine): the image serves an export
end to end on ports the test chooses, its HEALTHCHECK command answers inside it, it runs as uid 10001
and stops cleanly on SIGTERM, and none of the layers the Dockerfile adds holds a wheel.

scripts/image.sh builds it (making the python:3.11-slim base from Debian bookworm when container
storage lacks it). `buildah run --isolation chroot` shares the host's network, so the server inside
listens on host loopback; it is told which ports by USEREXPORT_* variables, as a deployment would be.
The build is `--no-cache` and every image it made is removed afterwards, so a run depends on no
layer an earlier one left; only the base image is kept, to be reused.
"""
from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import os
import pathlib
import re
import shlex
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.tools import required_tool
from userexport.client import UsersExportClient
from userexport_server.export.defaults import DEFAULT_CSV_FIELDS

ROOT = pathlib.Path(__file__).resolve().parents[2]
BASE = "docker.io/library/python:3.11-slim"
USERS = 1000
INSTALL = "apt-get install buildah podman mmdebstrap (scripts/setup.sh does)"
# The first test's share includes the build: about 50 s when the base is made too (mmdebstrap).
pytestmark = pytest.mark.timeout(600)


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """A command whose failure fails the test, with its output in the message."""
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
    return result


@pytest.fixture(scope="module")
def buildah() -> str:
    found = required_tool("buildah", INSTALL)
    required_tool("podman", INSTALL)
    required_tool("mmdebstrap", INSTALL)
    if os.geteuid() != 0:  # rootless would need subordinate ids and a user namespace set up by hand
        message = "building and running the image with buildah and mmdebstrap needs root here"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must run this check")
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def image(buildah: str) -> Iterator[str]:
    """The Dockerfile built into a tag of its own; it and every layer image the build made are
    removed afterwards (the base image stays, for the next run)."""
    tag = f"localhost/userexport-test:{uuid.uuid4().hex[:12]}"
    started = time.monotonic()
    build = subprocess.run(["bash", str(ROOT / "scripts/image.sh"), tag, "--no-cache"], cwd=ROOT,
                           capture_output=True, text=True, timeout=540)
    made = re.findall(r"^--> ([0-9a-f]{11,64})$", build.stdout, re.MULTILINE)
    try:
        assert build.returncode == 0, f"image build failed:\n{build.stdout[-4000:]}{build.stderr[-4000:]}"
        print(f"image {tag} built in {time.monotonic() - started:.0f} s")
        yield tag
    finally:
        subprocess.run([buildah, "rmi", tag], capture_output=True)
        for image_id in reversed(made):  # the build stage's and any left over; gone ones just fail
            subprocess.run([buildah, "rmi", image_id], capture_output=True)


def inspect_image(buildah: str, name: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(run(buildah, "inspect", "--type", "image", name).stdout)
    return result


def test_no_layer_the_dockerfile_adds_holds_a_wheel(buildah: str, image: str, tmp_path: pathlib.Path) -> None:
    """The wheels reach the final stage through a bind mount, so they are in no layer: a `COPY` of
    them, even one removed by a later `RUN`, would stay in the COPY's layer for every pull."""
    base_layers = inspect_image(buildah, BASE)["OCIv1"]["rootfs"]["diff_ids"]
    layers = inspect_image(buildah, image)["OCIv1"]["rootfs"]["diff_ids"]
    assert layers[:len(base_layers)] == base_layers, "the image is not built on the base image"
    added = layers[len(base_layers):]
    assert added
    run(buildah, "push", "--quiet", "--disable-compression", image, f"dir:{tmp_path / 'image'}")
    members: dict[str, list[str]] = {}
    for diff_id in added:  # uncompressed, each layer's file is named by its diff id
        with tarfile.open(tmp_path / "image" / diff_id.removeprefix("sha256:")) as layer:
            members[diff_id] = layer.getnames()
    names = [name for layer_names in members.values() for name in layer_names]
    assert any(name.endswith("userexport_server/main.py") for name in names), "the install is in no added layer"
    wheels = {diff_id: [n for n in layer_names if n.endswith(".whl") or "/wheels/" in f"/{n}"]
              for diff_id, layer_names in members.items()}
    assert not any(wheels.values()), wheels


def test_the_image_runs_the_server_as_10001_with_a_healthcheck(buildah: str, image: str) -> None:
    config = inspect_image(buildah, image)["Docker"]["config"]
    assert config["User"] == "10001"
    assert config["Entrypoint"] == ["userexport-server"] and config["Cmd"] == ["serve"]
    assert config["Healthcheck"]["Test"] == ["CMD", "userexport-server", "health"]
    assert {"50051/tcp", "50052/tcp", "9464/tcp"} <= set(config["ExposedPorts"])
    assert "USEREXPORT_DATA_DIR=/home/userexport/data" in config["Env"]


def test_the_data_directory_belongs_to_the_servers_user(buildah: str, image: str) -> None:
    """A named volume on it starts as a copy of the image's folder, owner included: the README's
    `docker run -v userexport-data:/home/userexport/data` works only if the folder is the server's."""
    container = run(buildah, "from", "--pull-never", image).stdout.strip()
    try:
        owner = run(buildah, "run", "--isolation", "chroot", container, "--", "stat", "-c", "%u %a",
                    "/home/userexport/data")
    finally:
        subprocess.run([buildah, "rm", container], capture_output=True)
    assert owner.stdout.split() == ["10001", "700"]


def free_ports(count: int) -> list[int]:
    """Ports the OS hands out now (bound together, so distinct); the container binds them next."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def server_process(buildah_pid: int) -> int:
    """The pid of `userexport-server serve` under `buildah run` (buildah does not pass SIGTERM on:
    it kills its child, so the test signals the server itself, as a container engine does PID 1)."""
    parents = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    for pid in parents:
        ancestor = parents.get(pid)
        while ancestor is not None and ancestor != buildah_pid:
            ancestor = parents.get(ancestor)
        if ancestor == buildah_pid:
            try:
                cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline[0].endswith(b"python3") and b"serve" in cmdline:
                return pid
    raise AssertionError(f"no userexport-server process under buildah run ({buildah_pid})")


def wait_serving(target: str, server: subprocess.Popen[bytes], log: pathlib.Path, timeout: float = 60) -> None:
    """Until the gRPC health service, asked from the host, says SERVING."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        while time.monotonic() < deadline:
            assert server.poll() is None, f"the server exited {server.returncode}:\n{log.read_text()}"
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == serving:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise AssertionError(f"not SERVING within {timeout} s:\n{log.read_text()}")


# The variable that sets where the server listens for each port the image exposes.
LISTEN_VARIABLES = {50051: "USEREXPORT_LISTEN", 50052: "USEREXPORT_FILES_LISTEN", 9464: "USEREXPORT_METRICS_LISTEN"}


def readme_docker_run() -> tuple[dict[str, str], list[str], dict[int, str]]:
    """The README's `docker run` line: its environment (-e), volume mount points (-v) and published
    ports (-p, container port -> host address)."""
    block = re.search(r"<!-- docker-run -->\n```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "the README lost its docker-run block"
    (line,) = [line for line in block.group(1).splitlines() if "docker run" in line]
    words = shlex.split(line.split("docker run", 1)[1])
    options = [(flag, value) for flag, value in itertools.pairwise(words) if flag in ("-e", "-v", "-p")]
    env = dict(value.split("=", 1) for flag, value in options if flag == "-e")
    volumes = [value.split(":")[1] for flag, value in options if flag == "-v"]
    published = {int(value.rsplit(":", 1)[1]): value.rsplit(":", 1)[0] for flag, value in options if flag == "-p"}
    return env, volumes, published


def test_an_export_through_the_container(buildah: str, image: str, tmp_path: pathlib.Path) -> None:
    """The README's `docker run` line, as buildah runs it: its environment and its volume (a folder of
    the server's user, as a named volume starts), and its published ports moved to free ones (buildah
    shares the host's network, so the server listens on them itself, and the URLs the line sets are
    moved with them). The server extra installed; seed, serve, health inside and out, a token minted
    in the container (`docker exec ... userexport token`), a CSV export by the CLI on the host
    downloaded over the signed URL, which names the public URL, its metrics, and a clean SIGTERM stop."""
    readme_env, volumes, published = readme_docker_run()
    assert volumes == ["/home/userexport/data"] and set(published) == {50051, 50052}
    ports = dict(zip(LISTEN_VARIABLES, free_ports(len(LISTEN_VARIABLES))))
    grpc_port, files_port, metrics_port = ports.values()
    for port, address in published.items():
        readme_env = {k: v.replace(address, f"127.0.0.1:{ports[port]}") for k, v in readme_env.items()}
    env = {**readme_env, **{variable: f"127.0.0.1:{ports[port]}" for port, variable in LISTEN_VARIABLES.items()}}
    assert env["USEREXPORT_FILES_PUBLIC_URL"] == f"http://127.0.0.1:{files_port}"
    volume = tmp_path / "volume"
    volume.mkdir()
    os.chown(volume, 10001, 10001)
    env_args = [arg for key, value in env.items() for arg in ("--env", f"{key}={value}")]
    container = run(buildah, "from", "--pull-never", "--name", f"userexport-test-{uuid.uuid4().hex[:12]}",
                    image).stdout.strip()
    in_container = [buildah, "run", "--isolation", "chroot", *env_args, "--volume", f"{volume}:{volumes[0]}",
                    container, "--"]  # the image's USER
    log = tmp_path / "server.log"
    server: subprocess.Popen[bytes] | None = None
    try:
        # Every requirement of the server extra is installed (no index: a missing one fails to resolve).
        extra = run(*in_container, "python", "-m", "pip", "install", "--no-index", "--dry-run", "userexport[server]")
        assert "Would install" not in extra.stdout, extra.stdout
        seeded = run(*in_container, "userexport-server", "seed", "--users", str(USERS))
        assert f"seeded {USERS} users" in seeded.stdout, seeded.stdout
        with log.open("wb") as out:
            server = subprocess.Popen([*in_container, "userexport-server", "serve"], stdout=out,
                                      stderr=subprocess.STDOUT)
        target = f"127.0.0.1:{grpc_port}"
        wait_serving(target, server, log)
        pid = server_process(server.pid)
        uid = re.search(r"^Uid:\s+(\d+)", pathlib.Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
        assert uid and uid.group(1) == "10001"

        health = run(*in_container, "userexport-server", "health")  # the HEALTHCHECK command
        assert health.stdout.strip() == "SERVING", health.stdout + health.stderr

        token = run(*in_container, "userexport", "token").stdout.strip()  # from the volume's secret
        assert (volume / "jwt_secret").is_file()
        output = tmp_path / "users.csv.gz"
        cli = pathlib.Path(sys.executable).with_name("userexport")
        export = subprocess.run([str(cli), "export", "--server", target, "--token", token, "--format", "csv",
                                 "--wait", "--output", str(output)], capture_output=True, text=True, timeout=120)
        assert export.returncode == 0, export.stdout + export.stderr
        rows = list(csv.reader(io.StringIO(gzip.decompress(output.read_bytes()).decode())))
        assert rows[0] == [field.title for field in DEFAULT_CSV_FIELDS]
        assert len(rows) == 1 + USERS
        assert [row[0] for row in rows[1:]] == sorted(row[0] for row in rows[1:])

        with UsersExportClient(target, token=token) as client:
            job = next(client.iter_jobs())
        assert job.location.startswith(env["USEREXPORT_FILES_PUBLIC_URL"] + "/"), job.location
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert f"userexport_export_rows_total {float(USERS)}" in metrics

        os.kill(pid, signal.SIGTERM)
        assert server.wait(60) == 0, log.read_text()
        assert "server stopped" in log.read_text()
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait(30)
        subprocess.run([buildah, "rm", container], capture_output=True)


def test_the_buildah_block_of_the_docs_ends_cleanly(buildah: str, image: str, tmp_path: pathlib.Path) -> None:
    """docs/operations.md's block as written, on the image built here and free ports: the server seeds,
    serves, answers health, exports through the host's CLI and stops with exit 0, so the block ends
    without buildah's `Error: exit status 1` (what `kill %1` of `buildah run` left)."""
    block = re.search(r"<!-- buildah-run -->\n```bash\n(.*?)```", (ROOT / "docs/operations.md").read_text(), re.S)
    assert block, "docs/operations.md lost its buildah block"
    build, *lines = block.group(1).strip().splitlines()
    assert build.startswith("bash scripts/image.sh localhost/userexport:dev")  # the fixture built it
    script = "\n".join(lines).replace("localhost/userexport:dev", image)
    for documented, port in zip((50061, 50062, 9465), free_ports(3)):
        script = script.replace(f"127.0.0.1:{documented}", f"127.0.0.1:{port}")
    environment = {**os.environ, "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=environment, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SERVING" in result.stdout and "Error" not in result.stderr, result.stdout + result.stderr
    assert "server stopped" in result.stderr and (tmp_path / "default.csv.gz").is_file()
