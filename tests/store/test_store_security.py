"""Auth, ACL users and TLS against real redis-servers; secrets redacted from every message and output."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest
from click.testing import CliRunner
from store_helpers import assert_entries_equal, kv_entry

from kvcomm.errors import KVCommError, StoreError, StoreFaultWarning
from kvcomm.store import RedisStore, from_url, redact
from kvcomm.store.security import resolve_secret
from kvcomm.tools.cli import main

PASSWORD = "s3cr3t/p@ss:word"  # needs quoting in a URL: both spellings must be redacted
ALICE_PW = "alice-Pw-7f3a9c"
SECRET = "0123456789abcdef-entry-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_secret(text: str, *secrets: str) -> None:
    for secret in (PASSWORD, quote(PASSWORD, safe=""), ALICE_PW, SECRET, *secrets):
        assert secret not in text, f"secret leaked into: {text}"


@pytest.fixture(scope="module")
def pw_server(redis_server):
    server = type(redis_server)("--requirepass", PASSWORD)  # conftest's RedisServer
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def acl_server(redis_server):
    server = type(redis_server)(
        "--user", "default", "off",
        "--user", "alice", "on", f">{ALICE_PW}", "~kvcomm:alice:*", "+@all",
    )
    yield server
    server.cleanup()


def _url(server, userinfo: str = "", query: str = "") -> str:
    return f"redis://{userinfo}127.0.0.1:{server.port}/0" + (f"?{query}" if query else "")


# -- requirepass -----------------------------------------------------------------------------------
def test_password_in_url_works_and_is_redacted_everywhere(pw_server, make_store, caplog) -> None:
    url = _url(pw_server, f":{quote(PASSWORD, safe='')}@")
    store = make_store(RedisStore, url, namespace="pw", check=True)
    entry = kv_entry()
    assert store.put("e", entry)
    assert_entries_equal(entry, store.get("e"))
    _no_secret(repr(store) + str(store.stats()) + store.url)
    assert "***" in store.stats()["url"] and "***" in repr(store)
    store.clear()


@pytest.mark.parametrize("userinfo", ["", ":wrong-password@"], ids=["missing", "wrong"])
def test_bad_credentials_at_construction_are_one_clear_error(pw_server, userinfo: str) -> None:
    with pytest.raises(StoreError) as info:
        RedisStore(_url(pw_server, userinfo), check=True)
    text = str(info.value)
    assert isinstance(info.value, KVCommError) and "\n" not in text
    assert "refused the credentials" in text and "default" in text
    _no_secret(text, "wrong-password")
    if userinfo:
        assert "***" in text


def test_bad_credentials_inside_operations_degrade_with_a_warning(pw_server, make_store, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="kvcomm.store")
    store = make_store(RedisStore, _url(pw_server, ":wrong-password@"), retry_after=0)
    with pytest.warns(StoreFaultWarning, match="auth") as record:
        assert store.get("e") is None
        assert store.put("e", kv_entry()) is False
        assert store.pool_increment("pool", "a") is None
        assert store.scan() == []
    stats = store.stats()
    assert stats["faults"]["auth"] == 4 and stats["misses"] == 1 and stats["put_failures"] == 1
    _no_secret(" ".join(str(w.message) for w in record) + caplog.text + str(stats), "wrong-password")


def test_password_in_redis_kwargs_is_scrubbed_too(pw_server, make_store) -> None:
    good = make_store(RedisStore, _url(pw_server), password=PASSWORD, check=True)
    assert good.put("k", kv_entry()) and good.delete("k")
    with pytest.raises(StoreError) as info:
        RedisStore(f"redis://127.0.0.1:{pw_server.port}/0?socket_timeout=x{PASSWORD}", password=PASSWORD)
    _no_secret(str(info.value))


def test_cli_stats_with_credentials(pw_server) -> None:
    runner = CliRunner()
    good = _url(pw_server, f":{quote(PASSWORD, safe='')}@", "namespace=cli")
    out = runner.invoke(main, ["store", "stats", "--store", good])
    assert out.exit_code == 0, out.output
    assert "***" in out.output and "signed" in out.output and "unsigned" in out.output
    _no_secret(out.output)
    for userinfo in ("", ":wrong-password@"):
        out = runner.invoke(main, ["store", "stats", "--store", _url(pw_server, userinfo)])
        lines = out.output.strip().splitlines()
        assert out.exit_code == 1 and len(lines) == 1, out.output
        assert lines[0].startswith("Error: StoreError:") and "refused the credentials" in lines[0]
        _no_secret(out.output, "wrong-password")


# -- ACL users -------------------------------------------------------------------------------------
def test_acl_user_works_in_its_namespace(acl_server, make_store) -> None:
    store = make_store(RedisStore, _url(acl_server, f"alice:{ALICE_PW}@"), namespace="alice", check=True)
    entry = kv_entry()
    assert store.put("e", entry) and store.pool_increment("pool", "a") == 1
    assert_entries_equal(entry, store.get("e"))
    assert store.usage()["entries"] == 1
    assert store.clear() == 2


def test_acl_user_denied_outside_its_key_pattern(acl_server, make_store) -> None:
    store = make_store(RedisStore, _url(acl_server, f"alice:{ALICE_PW}@"), namespace="bob", check=True)
    with pytest.warns(StoreFaultWarning, match="auth: .*ACL"):
        assert store.put("e", kv_entry()) is False
        assert store.get("e") is None
    assert store.stats()["faults"]["auth"] == 2


@pytest.mark.parametrize("userinfo", ["", "alice:wrong@", "mallory:x@"], ids=["default-off", "wrong", "unknown"])
def test_acl_bad_user_or_password(acl_server, userinfo: str) -> None:
    with pytest.raises(StoreError, match="refused the credentials") as info:
        RedisStore(_url(acl_server, userinfo), check=True)
    text = str(info.value)
    _no_secret(text, "alice:wrong@", "mallory:x@")
    assert ":***@" in text if userinfo else "user 'default'" in text


# -- environment ------------------------------------------------------------------------------------
def test_url_and_secret_from_environment(pw_server, monkeypatch, make_store) -> None:
    url = _url(pw_server, f":{quote(PASSWORD, safe='')}@")
    monkeypatch.delenv("KVCOMM_STORE_URL", raising=False)
    monkeypatch.setenv("KVCOMM_REDIS_URL", url)
    monkeypatch.setenv("KVCOMM_STORE_KEY", SECRET)
    store = make_store(RedisStore, namespace="envns", check=True)  # no URL: $KVCOMM_REDIS_URL
    assert store.signed and store.stats()["integrity"].startswith("hmac")
    assert store.put("e", kv_entry())
    built = from_url()  # no URL: $KVCOMM_STORE_URL, then $KVCOMM_REDIS_URL
    try:
        assert built.namespace == "default" and built.signed and built.get("e") is None
    finally:
        built.close()
    monkeypatch.setenv("KVCOMM_REDIS_URL", url + "?socket_timeout=3")
    out = CliRunner().invoke(main, ["store", "stats", "--json"], env={"KVCOMM_STORE_URL": url + "?namespace=envns"})
    assert out.exit_code == 0 and '"signed_entries": 1' in out.output, out.output
    _no_secret(out.output)
    assert not make_store(RedisStore, namespace="envns", secret="").signed  # "" turns signing off
    monkeypatch.setenv("KVCOMM_STORE_URL", "memory://")  # the store spec wins over the Redis URL
    assert from_url().kind == "memory"
    store.clear()


def test_short_or_url_borne_secrets_are_refused_without_echo(monkeypatch) -> None:
    with pytest.raises(StoreError, match="at least 16") as info:
        resolve_secret("short-Key1")
    assert "short-Key1" not in str(info.value)
    monkeypatch.setenv("KVCOMM_STORE_KEY", "tiny-Env")
    with pytest.raises(StoreError, match=r"\$KVCOMM_STORE_KEY") as info:
        RedisStore("redis://127.0.0.1:1/0")
    assert "tiny-Env" not in str(info.value)
    for name in ("secret", "key", "store_key"):
        with pytest.raises(StoreError, match="KVCOMM_STORE_KEY") as info:
            from_url(f"redis://127.0.0.1:1/0?{name}={SECRET}")
        _no_secret(str(info.value))


def test_redact() -> None:
    assert redact("redis://alice:pw@h:6379/0") == "redis://alice:***@h:6379/0"
    assert redact(f"rediss://:{quote(PASSWORD, safe='')}@h/0?ssl_ca_certs=/c/ca.pem") == \
        "rediss://:***@h/0?ssl_ca_certs=/c/ca.pem"
    assert redact("redis://h/0?password=pw&db=1&ssl_password=kp") == "redis://h/0?password=***&db=1&ssl_password=***"
    assert redact("redis://h:6379/0") == "redis://h:6379/0"
    assert redact("memory://") == "memory://" and redact("memory://?max_bytes=1GiB") == "memory://?max_bytes=1GiB"
    assert redact("redis://u:p@h:notaport/0") == "<unparsable url>"


def test_ping_failure_on_unknown_parameter_redacts(make_store) -> None:
    with pytest.raises(StoreError) as info:
        from_url(f"redis://u:{quote(PASSWORD, safe='')}@127.0.0.1:1/0?bogus=1")
    _no_secret(str(info.value))
    assert "u:***@" in str(info.value)


# -- TLS --------------------------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_pki(d: Path) -> None:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate (EC P-256)."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=kvcomm-test-ca",
             cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "1", "-extfile", "san.ext", cwd=d)


@pytest.fixture(scope="module")
def tls_server(redis_server, tmp_path_factory):
    binary = shutil.which("redis-server")
    if shutil.which("openssl") is None:
        pytest.skip("TLS test skipped: the openssl command is not installed (needed to make a throw-away CA)")
    d = tmp_path_factory.mktemp("tls")
    _make_pki(d)
    tls_args = ["--tls-cert-file", str(d / "server.crt"), "--tls-key-file", str(d / "server.key"),
                "--tls-ca-cert-file", str(d / "ca.crt")]
    # a TLS-capable build loads the certificates, then exits as it has nothing to listen on
    probe = subprocess.run([binary, "--port", "0", "--tls-port", "0", *tls_args, "--save", ""],
                           capture_output=True, text=True, timeout=10)
    said = (probe.stdout + probe.stderr).strip()
    if "not listen anywhere" not in said:
        pytest.skip(f"TLS test skipped: the installed redis-server does not support TLS: {said.splitlines()[-1:]}")
    port = _free_port()
    server = type(redis_server)("--tls-port", str(port), *tls_args, "--tls-auth-clients", "yes")
    server.tls_port, server.pki = port, d
    yield server
    server.cleanup()


def test_rediss_with_ca_and_client_certificate(tls_server, make_store) -> None:
    d = tls_server.pki
    url = (f"rediss://127.0.0.1:{tls_server.tls_port}/0?namespace=tls&ssl_cert_reqs=required"
           f"&ssl_ca_certs={d / 'ca.crt'}&ssl_certfile={d / 'client.crt'}&ssl_keyfile={d / 'client.key'}")
    store = from_url(url, secret=SECRET)
    try:
        store.ping()
        entry = kv_entry()
        assert store.put("e", entry) and store.signed
        assert_entries_equal(entry, store.get("e"))
        assert store.stats()["url"].startswith("rediss://") and store.clear() == 1
    finally:
        store.close()


@pytest.mark.parametrize("query", ["ssl_cert_reqs=required", "ssl_cert_reqs=required&ssl_ca_certs={ca}"],
                         ids=["untrusted-server", "no-client-cert"])
def test_rediss_refused_without_trust_or_client_certificate(tls_server, query: str) -> None:
    url = f"rediss://127.0.0.1:{tls_server.tls_port}/0?" + query.format(ca=tls_server.pki / "ca.crt")
    with pytest.raises(StoreError, match="not reachable") as info:
        from_url(url).ping()
    assert "\n" not in str(info.value)


def test_plain_client_cannot_talk_to_the_tls_port(tls_server, make_store) -> None:
    store = make_store(RedisStore, f"redis://127.0.0.1:{tls_server.tls_port}/0", socket_timeout=1, retry_after=0)
    with pytest.warns(StoreFaultWarning):
        assert store.get("e") is None
