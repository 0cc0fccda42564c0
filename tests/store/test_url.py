"""Store URLs parsed once into typed specs (kvcomm.store.url, kvcomm.store.spec); no server needed."""

from __future__ import annotations

import dataclasses
from urllib.parse import parse_qsl, urlsplit

import pytest
import torch

from kvcomm.errors import StoreError
from kvcomm.store import (
    MemorySpec,
    MemoryStore,
    RedisSpec,
    RedisStore,
    TieredStore,
    from_url,
    open_store,
    parse_size,
    parse_store_url,
    parse_store_urls,
    store_urls_from_env,
)
from kvcomm.store.codec import DEFAULT_MAX_ENTRY_BYTES
from kvcomm.store.spec import DEFAULT_MAX_BYTES
from kvcomm.store.url import DEFAULT_REDIS_URL, redis_spec

ENV = ("KVCOMM_STORE_URL", "KVCOMM_REDIS_URL", "KVCOMM_STORE_KEY")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def _query(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query))


# -- memory:// ---------------------------------------------------------------------------------------
def test_memory_defaults() -> None:
    for url in ("memory://", "memory:///", "MEMORY://"):
        assert parse_store_url(url) == MemorySpec(namespace="default", device="cpu", max_bytes=DEFAULT_MAX_BYTES, ttl=None)


def test_memory_every_parameter() -> None:
    spec = parse_store_url("memory://?max_bytes=2MiB&device=cuda:1&namespace=team1&ttl=2.5")
    assert spec == MemorySpec(namespace="team1", device="cuda:1", max_bytes=2 << 20, ttl=2.5)
    assert parse_store_url("memory://?prefix=p").namespace == "p"  # DESIGN.md spelling
    assert parse_store_url("memory://?prefix=p&namespace=n").namespace == "n"  # namespace wins


def test_namespace_argument_is_for_urls_without_one() -> None:
    assert parse_store_url("memory://", namespace="inherited").namespace == "inherited"
    assert parse_store_url("memory://?namespace=own", namespace="inherited").namespace == "own"


@pytest.mark.parametrize(
    "url, match",
    [
        ("memory://host", "bad memory store URL"),
        ("memory:///some/path", "bad memory store URL"),
        ("memory://?max_bytes=lots", "bad max_bytes 'lots'"),
        ("memory://?ttl=soon", "bad ttl 'soon': use a number of seconds"),
        ("memory://?ttl=-1", "bad ttl '-1': must be >= 0"),
        ("memory://?namespace=a:b", "bad namespace 'a:b'"),
        ("memory://?codec=int8", "unknown parameter 'codec'.*accepted: max_bytes, device"),
        ("memory://?socket_timeout=1", "unknown parameter 'socket_timeout'"),  # redis-py's: not for memory
    ],
)
def test_memory_errors_name_what_is_wrong(url: str, match: str) -> None:
    with pytest.raises(StoreError, match=match) as info:
        parse_store_url(url)
    assert "\n" not in str(info.value)


# -- redis://, rediss://, unix:// ----------------------------------------------------------------------
def test_redis_defaults() -> None:
    spec = parse_store_url("redis://127.0.0.1:6379/0")
    assert isinstance(spec, RedisSpec)
    assert (spec.namespace, spec.ttl, spec.codec, spec.device) == ("default", None, "raw", "cpu")
    assert (spec.max_entry_bytes, spec.max_fetch_bytes, spec.fetch_window, spec.retry_after) == \
        (DEFAULT_MAX_ENTRY_BYTES, None, 1.0, 1.0)
    assert spec.url == spec.display_url == "redis://127.0.0.1:6379/0" and dict(spec.client_kwargs) == {}


def test_redis_every_kvcomm_parameter_leaves_the_connection_url() -> None:
    spec = parse_store_url(
        "redis://h:6380/2?namespace=team1&ttl=3600&codec=int8&device=cuda&max_entry_bytes=64MiB"
        "&max_fetch_bytes=1GB&fetch_window=0.5&retry_after=3&socket_timeout=2&ssl_cert_reqs=required"
    )
    assert isinstance(spec, RedisSpec)
    assert (spec.namespace, spec.ttl, spec.codec, spec.device) == ("team1", 3600.0, "int8", "cuda")
    assert (spec.max_entry_bytes, spec.max_fetch_bytes) == (64 << 20, 10**9)
    assert (spec.fetch_window, spec.retry_after) == (0.5, 3.0)
    parts = urlsplit(spec.url)
    assert (parts.scheme, parts.hostname, parts.port, parts.path) == ("redis", "h", 6380, "/2")
    assert _query(spec.url) == {"socket_timeout": "2", "ssl_cert_reqs": "required"}  # redis-py's own only


@pytest.mark.parametrize("url", ["rediss://h:6380/0?ssl_ca_certs=/etc/ca.pem", "unix:///tmp/redis.sock?db=1",
                                 "REDIS://h/0"])
def test_tls_and_unix_schemes(url: str) -> None:
    spec = parse_store_url(url)
    assert isinstance(spec, RedisSpec)
    assert urlsplit(spec.url).scheme == urlsplit(url).scheme
    assert _query(spec.url) == _query(url)


@pytest.mark.parametrize(
    "url, match",
    [
        ("redis:///0", "no host"),
        ("redis://127.0.0.1:99999/0", "port is not a number"),
        ("redis://127.0.0.1:port/0", "port is not a number"),
        ("redis://h/0?ttl=-3", "bad ttl '-3'"),
        ("redis://h/0?codec=zip", "unknown codec 'zip'"),
        ("redis://h/0?namespace=a b", "bad namespace"),
        ("redis://h/0?max_entry_bytes=big", "bad max_entry_bytes 'big'"),
        ("redis://h/0?max_entry_bytes=0", "max_entry_bytes must be a positive int"),
        ("redis://h/0?max_fetch_bytes=0", "max_fetch_bytes must be a positive int"),
        ("redis://h/0?fetch_window=0", "fetch_window must be > 0"),
        ("redis://h/0?retry_after=x", "bad retry_after 'x'"),
        ("redis://h/0?colour=blue", "unknown parameter 'colour'.*accepted: namespace"),
        ("redis://me:s3cret@h/0?colour=blue", r"me:\*\*\*@h"),  # the password never shows
        ("ftp://x", "unknown store URL scheme"),
        ("x", "unknown store URL scheme"),
        ("redis://[::1/0", "unparsable store URL"),
    ],
)
def test_redis_errors_name_what_is_wrong(url: str, match: str) -> None:
    with pytest.raises(StoreError, match=match) as info:
        parse_store_url(url)
    assert "\n" not in str(info.value) and "s3cret" not in str(info.value)


@pytest.mark.parametrize("name", ["secret", "key", "store_key", "token", "Secret"])
def test_entry_secrets_are_refused_in_urls_without_echo(name: str) -> None:
    value = "0123456789abcdef-never-in-a-url"
    for url in (f"redis://h/0?{name}={value}", f"memory://?{name}={value}"):
        with pytest.raises(StoreError, match=r"\$KVCOMM_STORE_KEY") as info:
            parse_store_url(url)
        assert value not in str(info.value) and repr(name) in str(info.value)


def test_passwords_are_kept_for_redis_but_never_shown() -> None:
    spec = parse_store_url("redis://alice:pw%2Fsecret@h:6379/0?namespace=n&ssl_password=kp1234")
    assert isinstance(spec, RedisSpec)
    assert urlsplit(spec.url).password == "pw%2Fsecret" and _query(spec.url)["ssl_password"] == "kp1234"
    assert spec.display_url == "redis://alice:***@h:6379/0?ssl_password=***"
    for text in (repr(spec), spec.display_url):
        assert "pw" not in text.replace("password", "") and "kp1234" not in text
    assert {"pw/secret", "pw%2Fsecret", "kp1234"} <= set(spec.secrets)


def test_specs_are_frozen_values() -> None:
    spec = parse_store_url("redis://h/0?namespace=n")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.namespace = "other"  # type: ignore[misc]
    assert spec == parse_store_url("redis://h/0?namespace=n") and hash(spec) == hash(parse_store_url("redis://h/0?namespace=n"))
    with pytest.raises(TypeError):
        spec.client_kwargs["password"] = "x"  # type: ignore[index]


# -- several URLs: one tiered store --------------------------------------------------------------------
def test_several_urls_share_one_namespace() -> None:
    specs = parse_store_urls("memory://?max_bytes=1GB, redis://h/0?prefix=team2")
    assert [type(s) for s in specs] == [MemorySpec, RedisSpec]
    assert [s.namespace for s in specs] == ["team2", "team2"]  # the memory tier inherits it
    assert specs == parse_store_urls("memory://?max_bytes=1GB", "redis://h/0?prefix=team2")
    assert [s.namespace for s in parse_store_urls("memory://", "redis://h/0")] == ["default", "default"]


def test_several_urls_errors() -> None:
    with pytest.raises(StoreError, match=r"different namespaces: \['a', 'b'\]"):
        parse_store_urls("memory://?namespace=a,redis://h/0?namespace=b")
    for empty in ((), ("",), (" ",)):
        with pytest.raises(StoreError, match="no store URL given"):
            parse_store_urls(*empty)


# -- sizes ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, size", [("123", 123), ("1KiB", 1024), ("1.5GB", 1_500_000_000), ("2mib", 2 << 20),
                                        ("3G", 3 * 10**9), ("7 b", 7), (" 4k ", 4000), ("1TiB", 1 << 40)])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1", "1 XB", "1e9", "GB"])
def test_parse_size_errors_name_the_field(text: str) -> None:
    with pytest.raises(StoreError, match=f"bad max_bytes {text!r}"):
        parse_size(text, "max_bytes")


# -- the environment -----------------------------------------------------------------------------------
def test_env_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    assert store_urls_from_env() == [DEFAULT_REDIS_URL] == ["redis://127.0.0.1:6379/0"]
    monkeypatch.setenv("KVCOMM_REDIS_URL", "redis://r:1/0")
    assert store_urls_from_env() == ["redis://r:1/0"]
    monkeypatch.setenv("KVCOMM_STORE_URL", "memory://,redis://s:2/0")
    assert store_urls_from_env() == ["memory://,redis://s:2/0"]  # the full store spec wins
    monkeypatch.setenv("KVCOMM_STORE_URL", "")  # set but empty: the next one
    assert store_urls_from_env() == ["redis://r:1/0"]


def test_from_url_without_urls_reads_the_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVCOMM_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("KVCOMM_STORE_URL", "memory://?namespace=envns&max_bytes=1MiB")
    store = from_url()
    try:
        assert isinstance(store, MemoryStore) and store.namespace == "envns" and store.max_bytes == 1 << 20
    finally:
        store.close()


def test_redis_store_without_url_takes_the_envs_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    assert redis_spec().url == DEFAULT_REDIS_URL
    monkeypatch.setenv("KVCOMM_REDIS_URL", "redis://r:1/0")
    assert redis_spec(namespace="n").url == "redis://r:1/0"
    monkeypatch.setenv("KVCOMM_STORE_URL", "memory://,redis://s:2/3?socket_timeout=4")
    assert redis_spec().url == "redis://s:2/3?socket_timeout=4"  # the Redis tier of the store spec
    monkeypatch.setenv("KVCOMM_STORE_URL", "memory://")
    with pytest.raises(StoreError, match=r"one Redis URL in \$KVCOMM_STORE_URL.*found 0"):
        redis_spec()


# -- RedisStore(url, ...) goes through the same parser ---------------------------------------------------
def test_redis_store_url_is_a_connection_url() -> None:
    spec = redis_spec("redis://u:pw@h:1/0?socket_timeout=3", namespace="n", ttl=5, codec="int8",
                      client_kwargs={"ssl_password": "kp-secret"})
    assert (spec.url, spec.namespace, spec.ttl, spec.codec) == ("redis://u:pw@h:1/0?socket_timeout=3", "n", 5, "int8")
    assert "kp-secret" in spec.secrets and "pw" in spec.secrets
    with pytest.raises(StoreError, match="redis-py does not take: namespace, ttl.*from_url"):
        redis_spec("redis://h/0?namespace=n&ttl=1")
    with pytest.raises(StoreError, match="needs a Redis URL"):
        redis_spec("memory://")
    with pytest.raises(StoreError, match="no host"):
        redis_spec("redis:///0", client_kwargs={"password": "kw-secret"})
    with pytest.raises(StoreError) as info:
        redis_spec("redis://h/0?bogus=kw-secret", client_kwargs={"password": "kw-secret"})
    assert "kw-secret" not in str(info.value) and "bogus" in str(info.value)


def test_stores_are_built_from_specs_as_given() -> None:
    mem = open_store(parse_store_url("memory://?max_bytes=1MiB&ttl=9&namespace=m"))
    assert isinstance(mem, MemoryStore)
    assert (mem.namespace, mem.max_bytes, mem.ttl, mem.device) == ("m", 1 << 20, 9.0, torch.device("cpu"))
    spec = parse_store_url("redis://u:pw@127.0.0.1:1/0?namespace=r&codec=int8&max_fetch_bytes=1KiB&retry_after=0")
    assert isinstance(spec, RedisSpec)
    red = RedisStore.from_spec(spec, secret="")  # does not connect
    try:
        assert red.spec is spec and (red.namespace, red.codec, red.max_fetch_bytes, red.retry_after) == \
            ("r", "int8", 1024, 0.0)
        assert red.url == spec.display_url == "redis://u:***@127.0.0.1:1/0" and not red.signed
        same = RedisStore("redis://u:pw@127.0.0.1:1/0", namespace="r", codec="int8", max_fetch_bytes=1024,
                          retry_after=0, secret="")
        assert same.spec == spec
        same.close()
    finally:
        red.close()
    tiered = from_url("memory://", "memory://?namespace=t")
    try:
        assert isinstance(tiered, TieredStore) and [t.namespace for t in tiered.tiers] == ["t", "t"]
    finally:
        tiered.close()


def test_from_url_namespace_overrides_the_urls() -> None:
    store = from_url("memory://?namespace=a,redis://127.0.0.1:1/0?ttl=5", namespace="run-1", secret="")
    try:
        assert isinstance(store, TieredStore) and [t.namespace for t in store.tiers] == ["run-1", "run-1"]
        assert store.tiers[1].ttl == 5.0
    finally:
        store.close()
    with pytest.raises(StoreError, match="bad namespace"):
        from_url("memory://", namespace="a:b")


# -- Redis Cluster -------------------------------------------------------------------------------------
def test_cluster_urls() -> None:
    spec = parse_store_url("redis+cluster://alice:pw@10.0.0.1:7000,redis-b:7001,[::1]:7002,redis-c/"
                           "?namespace=team1&chunk_bytes=16MiB&buffer_bytes=0&socket_timeout=3&ttl=60")
    assert isinstance(spec, RedisSpec) and spec.cluster
    assert spec.nodes == (("10.0.0.1", 7000), ("redis-b", 7001), ("::1", 7002), ("redis-c", 6379))
    assert (spec.namespace, spec.chunk_bytes, spec.buffer_bytes, spec.ttl) == ("team1", 16 << 20, 0, 60.0)
    assert spec.url == "redis://alice:pw@10.0.0.1:7000?socket_timeout=3"  # redis-py's: the first node
    assert spec.display_url == "redis+cluster://alice:***@10.0.0.1:7000,redis-b:7001,[::1]:7002,redis-c:6379" \
                               "?socket_timeout=3"
    assert "pw" in spec.secrets and "pw" not in repr(spec).replace("display_url", "")
    tls = parse_store_url("rediss+cluster://h1:7000,h2:7000?ssl_ca_certs=/etc/ca.pem")
    assert tls.cluster and tls.url == "rediss://h1:7000?ssl_ca_certs=%2Fetc%2Fca.pem"
    assert not parse_store_url("redis://h/0").cluster and parse_store_url("redis://h/0").chunk_bytes == 64 << 20
    one = redis_spec("redis+cluster://h1:7000,h2:7000", namespace="n")  # RedisStore(url) takes them too
    assert one.cluster and one.nodes == (("h1", 7000), ("h2", 7000)) and one.url == "redis://h1:7000"
    store = RedisStore("redis+cluster://127.0.0.1:1,127.0.0.1:2", namespace="n", secret="")  # does not connect
    assert store.kind == "redis-cluster" and "127.0.0.1:2" in repr(store)
    store.close()


@pytest.mark.parametrize(
    "url, match",
    [
        ("redis+cluster://h1:7000/1", "only database 0"),
        ("redis+cluster://h1:7000,h2:port", "'h2:port' is not host:port"),
        ("redis+cluster://h1:7000,,h2:7000", "empty host"),
        ("redis+cluster://me:s3cret@h1:99999", r"me:\*\*\*@"),
        ("redis://h/0?chunk_bytes=100", "chunk_bytes must be an int >= 4096"),
        ("redis://h/0?buffer_bytes=lots", "bad buffer_bytes"),
        ("redis+cluster://h1:7000?colour=blue", "unknown parameter 'colour'"),
    ],
)
def test_cluster_url_errors(url: str, match: str) -> None:
    with pytest.raises(StoreError, match=match) as info:
        parse_store_url(url)
    assert "s3cret" not in str(info.value)
