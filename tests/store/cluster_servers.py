"""A real local Redis Cluster of three masters for the tests (imported as ``cluster_servers``).

Three ``redis-server --cluster-enabled yes`` processes on free ports (each also needs its cluster
bus port, +10000, free), joined by ``redis-cli --cluster create ... --cluster-replicas 0
--cluster-yes``; ready when every node says ``cluster_state:ok``. No persistence; each node's
config file lives in a temp dir removed at teardown. ``cluster-require-full-coverage no``: when a
master dies the others keep serving their slots (what the README recommends for kvcomm).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

import redis

MASTERS = 3


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket() as bus:
                bus.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisClusterServers:
    """Three cluster-enabled redis-servers joined into one cluster (all slots assigned)."""

    def __init__(self, *extra_args: str) -> None:
        binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if binary is None or cli is None:
            raise RuntimeError("redis-server and redis-cli are needed (make test installs them with apt-get)")
        self.dir = tempfile.mkdtemp(prefix="kvcomm-cluster-")
        self.ports: list[int] = []
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        try:
            for _ in range(MASTERS):
                port = _free_cluster_port()
                self.ports.append(port)
                self.procs[port] = subprocess.Popen(
                    [binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                     "--cluster-config-file", f"{self.dir}/nodes-{port}.conf", "--cluster-node-timeout", "2000",
                     "--cluster-require-full-coverage", "no", "--save", "", "--appendonly", "no",
                     "--dir", self.dir, "--daemonize", "no", "--loglevel", "warning", *extra_args],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
            for port in self.ports:
                self._wait_listening(port)
            nodes = [f"127.0.0.1:{p}" for p in self.ports]
            subprocess.run([cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
                           check=True, capture_output=True, timeout=60)
            self._wait_ok()
        except BaseException:
            self.cleanup()
            raise

    @property
    def url(self) -> str:
        """``redis+cluster://`` naming the first node only: the client finds the others."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    @property
    def url_all(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port)

    def port_of(self, key: str) -> int:
        """The port of the master that holds ``key`` (asks the cluster)."""
        with self.client(self.ports[0]) as c:
            slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(master[1])
        raise KeyError(key)

    @staticmethod
    def _wait_listening(port: int) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {port}")

    def _wait_ok(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = []
            for port in self.ports:
                with self.client(port) as c:
                    states.append(c.execute_command("CLUSTER", "INFO").decode())
            if all("cluster_state:ok" in s for s in states):
                return
            time.sleep(0.1)
        raise RuntimeError("the cluster did not reach cluster_state:ok")

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port, None)
        if proc is not None:
            proc.kill()
            proc.wait(timeout=10)

    def cleanup(self) -> None:
        for port in list(self.procs):
            self.kill(port)
        shutil.rmtree(self.dir, ignore_errors=True)
