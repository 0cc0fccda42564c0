"""Which Redis server holds a key: one server, or the shards of a Redis Cluster (redis-py's RedisCluster).

A :class:`RedisStore <kvcomm.store.RedisStore>` sends every command to a :class:`Node`: one
server with its redis-py client, connection pool and health (a node that just failed is skipped
for ``retry_after`` seconds, so a dead shard costs nothing per call while the others serve).
:class:`SingleServer` has one node. :class:`Cluster` builds redis-py's ``RedisCluster`` on first
use (so constructing a store never connects), reads the slot map from it, and maps each key to the
primary that owns its hash slot; after a connection fault or a ``MOVED`` reply the map is read
again before the next command (a failover or a resharding moves slots).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from kvcomm.store.spec import RedisSpec

#: what a topology raises when it cannot say where a key lives (cluster unreachable, slot unserved)
TopologyError = RedisClusterException


class Node:
    """One Redis server: its name (``host:port``), its redis-py client and its health."""

    def __init__(self, name: str, client: redis.Redis) -> None:
        self.name = name
        self.client = client
        self.degraded = False  # its last command failed on the connection
        self.skip_until = 0.0  # monotonic time before which it is not tried again

    def __repr__(self) -> str:
        return f"Node({self.name!r})"


class Topology(ABC):
    """The servers of one store and which one holds a key."""

    cluster = False

    @abstractmethod
    def node_for(self, full_key: str) -> Node:
        """The node that holds ``full_key`` (raises :data:`TopologyError` if none can be found)."""

    @abstractmethod
    def primaries(self) -> list[Node]:
        """Every node that holds keys (one server, or each shard's primary)."""

    def stale(self) -> None:  # noqa: B027 - nothing to refresh on one server
        """The key -> node map may be out of date: read it again before the next lookup."""

    @property
    def degraded(self) -> bool:
        return any(node.degraded for node in self.known())

    @abstractmethod
    def known(self) -> list[Node]:
        """The nodes met so far (no network)."""

    @abstractmethod
    def close(self) -> None:
        """Disconnect every node."""


class SingleServer(Topology):
    """One Redis server (``redis://``, ``rediss://``, ``unix://``)."""

    def __init__(self, name: str, client: redis.Redis) -> None:
        self.node = Node(name, client)

    def node_for(self, full_key: str) -> Node:
        return self.node

    def primaries(self) -> list[Node]:
        return [self.node]

    def known(self) -> list[Node]:
        return [self.node]

    def close(self) -> None:
        self.node.client.close()


class Cluster(Topology):
    """The primaries of a Redis Cluster, found from any reachable startup node.

    Args:
        spec: a cluster spec: ``spec.url`` holds the credentials and TLS options of every node,
            ``spec.nodes`` the startup nodes.
        client_kwargs: keyword arguments of every node's ``redis.Redis`` (timeouts, ...).
    """

    cluster = True

    def __init__(self, spec: RedisSpec, client_kwargs: dict[str, Any]) -> None:
        self.spec = spec
        self.client_kwargs = client_kwargs
        self._client: RedisCluster | None = None
        self._lock = threading.Lock()
        self._stale = False
        self._nodes: dict[str, Node] = {}

    @property
    def client(self) -> RedisCluster:
        """redis-py's cluster client, built (and the slot map read) on first use."""
        with self._lock:
            if self._client is None:
                startup = [ClusterNode(host, port) for host, port in self.spec.nodes[1:]]
                self._client = RedisCluster(
                    url=self.spec.url, startup_nodes=startup, require_full_coverage=False,
                    # kvcomm decides what a failure costs (a miss, the node skipped for a while);
                    # redis-py retrying with backoff would only make every call on a dead shard slow
                    retry=Retry(NoBackoff(), 0), **self.client_kwargs,
                )
                self._stale = False
            elif self._stale:
                self._client.nodes_manager.initialize()
                self._stale = False
            return self._client

    def _node(self, cnode: ClusterNode) -> Node:
        node = self._nodes.get(cnode.name)
        if node is None or node.client is not cnode.redis_connection:
            client = self.client.get_redis_connection(cnode)
            old = node
            node = Node(cnode.name, client)
            if old is not None:  # keep its health across a refresh of the slot map
                node.degraded, node.skip_until = old.degraded, old.skip_until
            self._nodes[cnode.name] = node
        return node

    def node_for(self, full_key: str) -> Node:
        client = self.client
        cnode = client.nodes_manager.get_node_from_slot(key_slot(full_key.encode("utf-8")))
        return self._node(cnode)

    def primaries(self) -> list[Node]:
        return [self._node(cnode) for cnode in self.client.get_primaries()]

    def stale(self) -> None:
        self._stale = True

    def known(self) -> list[Node]:
        return list(self._nodes.values())

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


__all__ = ["Cluster", "Node", "SingleServer", "Topology", "TopologyError"]
