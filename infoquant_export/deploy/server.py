"""Start the ``tritonserver`` bundled in the PyPI wheel ``nvidia-pytriton`` on 127.0.0.1 (tests, benchmarks).

The wheel ships the server, the Python backend and one stub per Python version; the stub for this interpreter is
copied next to the backend once (the documented set-up), then the server runs on free local ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from infoquant_export.errors import UserError


def pytriton_root() -> Path:
    """``<site-packages>/pytriton/tritonserver``; UserError when nvidia-pytriton is not installed."""
    try:
        import pytriton
    except ImportError as err:
        raise UserError("nvidia-pytriton is not installed (it bundles tritonserver)",
                        'pip install nvidia-pytriton "tritonclient[all]"') from err
    root = Path(pytriton.__file__).parent / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise UserError(f"{root} has no bin/tritonserver", "reinstall nvidia-pytriton")
    return root


def backend_dir() -> Path:
    """The backends directory, with this Python's stub in ``backends/python`` (copied on first use)."""
    root = pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    target = root / "backends" / "python" / "triton_python_backend_stub"
    if not target.is_file():
        if not stub.is_file():
            raise UserError(f"nvidia-pytriton has no Python backend stub for Python {version}",
                            "use Python 3.8-3.13")
        tmp = target.with_name(f".stub-{os.getpid()}")
        shutil.copy2(stub, tmp)
        os.replace(tmp, target)
    return root / "backends"


def stub_environment() -> dict[str, str]:
    """PATH with this interpreter's bin directory first (the stub finds its environment through ``python3`` on
    PATH, as PyTriton does) and LD_LIBRARY_PATH with this interpreter's libpython (the stub must load the same
    Python build as the environment's extension modules, e.g. pyenv's, not the distribution's)."""
    import sysconfig

    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and sysconfig.get_config_var("Py_ENABLE_SHARED"):
        env["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, env.get("LD_LIBRARY_PATH", "")])
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    http_port: int
    grpc_port: int
    log_path: Path

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def ready(self, model: str | None = None) -> bool:
        path = f"/v2/models/{model}/ready" if model else "/v2/health/ready"
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def generate(self, model: str, body: dict, timeout: float = 600) -> tuple[int, dict]:
        """POST /v2/models/<model>/generate; (HTTP status, JSON body)."""
        request = urllib.request.Request(f"http://{self.http_url}/v2/models/{model}/generate",
                                         data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")


def stop(process: subprocess.Popen, grace: float = 15) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def triton_server(repository: str | Path, log_path: str | Path, timeout: float = 300,
                  extra_args: tuple[str, ...] = ()) -> Iterator[Server]:
    """Run tritonserver on 127.0.0.1 with ``repository``; wait until every model is ready; always stop it.

    The stub embeds Python and imports numpy (triton_python_backend_utils) before model.py runs; it finds its
    environment through ``python3`` on PATH, so this interpreter's bin directory goes first (as PyTriton does)."""
    root = pytriton_root()
    backends = backend_dir()
    http, grpc, metrics = free_port(), free_port(), free_port()
    log_path = Path(log_path)
    cmd = [str(root / "bin" / "tritonserver"), "--model-repository", str(repository),
           "--backend-directory", str(backends), "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1",
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
           "--allow-metrics", "false", "--exit-on-error", "true", "--log-verbose", "0", *extra_args]
    env = stub_environment()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    server = Server(process, http, grpc, log_path)
    try:
        deadline = time.monotonic() + timeout
        while not server.ready():
            if process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {process.returncode}:\n{server.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tritonserver not ready after {timeout} s:\n{server.log()[-4000:]}")
            time.sleep(0.5)
        yield server
    finally:
        stop(process)
