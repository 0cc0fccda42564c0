"""Shared fixtures: a real throw-away redis-server, the real SmolLM2 model, seeds."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server in a temp dir on a free port, no persistence."""

    def __init__(self, *extra_args: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (make test installs it with apt-get)")
        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="kvcomm-redis-")
        self.args = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", self.dir, "--daemonize", "no", "--loglevel", "warning", *extra_args,
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the whole test session."""
    server = RedisServer()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def fresh_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own (to kill, restart or configure)."""
    server = RedisServer()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (fp32, CPU), loaded once per session."""
    from kvcomm.models import load_model

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    return load_model("smollm2-135m", dtype="float32", device="cpu")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture
def watch_engine_calls(monkeypatch):
    """``watch(engine)`` -> stats of the engine's calls from threads: its planner's
    ``plan_with_anchors`` (inside ``generate`` under kvcomm) lingers 20 ms and counts the calls inside at once (``most``) and the threads
    they came from (``threads``): calls that were not serialised would meet there."""

    def watch(engine: Any) -> SimpleNamespace:
        stats = SimpleNamespace(now=0, most=0, threads=set())
        plan = engine.planner.plan_with_anchors

        def slow_plan(*args: Any, **kwargs: Any) -> Any:
            stats.threads.add(threading.get_ident())
            stats.now += 1
            stats.most = max(stats.most, stats.now)
            time.sleep(0.02)
            stats.now -= 1
            return plan(*args, **kwargs)

        monkeypatch.setattr(engine.planner, "plan_with_anchors", slow_plan)
        return stats

    return watch
