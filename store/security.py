"""Secrets of the store: where the entry key comes from, and how secrets are kept out of text.

- Store URLs (which may hold a Redis password): an explicit argument, else
  :func:`kvcomm.store.url.store_urls_from_env` (``$KVCOMM_STORE_URL`` > ``$KVCOMM_REDIS_URL`` >
  ``redis://127.0.0.1:6379/0``).
- Entry key (the HMAC secret that signs entries): an explicit ``secret`` argument, else
  ``$KVCOMM_STORE_KEY``; ``secret=""`` turns signing off even when the variable is set. It is never
  read from a URL (a URL ends up in logs, shell history and ``ps``).
- :func:`redact` hides the password of a URL (and secret-like query values);
  :func:`scrub` hides known secret strings in any message before it is logged or raised.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

from kvcomm.errors import StoreError

STORE_KEY_ENV = "KVCOMM_STORE_KEY"
MIN_SECRET_BYTES = 16
REDACTED = "***"

#: query parameters whose values are secrets (redacted; the entry-key ones are refused in URLs)
SECRET_PARAMS = frozenset({"password", "ssl_password", "secret", "key", "store_key", "token"})
ENTRY_KEY_PARAMS = frozenset({"secret", "key", "store_key", "token"})


def resolve_secret(secret: str | bytes | None) -> bytes | None:
    """The HMAC key as bytes: ``secret``, else ``$KVCOMM_STORE_KEY``; None (unsigned) for ``""``.

    Raises:
        StoreError: a key shorter than 16 bytes (the message never shows the key).
    """
    if secret is None:
        secret = os.environ.get(STORE_KEY_ENV, "")
        where = f"${STORE_KEY_ENV}"
    else:
        where = "secret"
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    if not isinstance(secret, bytes | bytearray):
        raise StoreError(f"{where} must be str or bytes, got {type(secret).__name__}")
    if not secret:
        return None
    if len(secret) < MIN_SECRET_BYTES:
        raise StoreError(
            f"{where} is {len(secret)} bytes; use at least {MIN_SECRET_BYTES} random bytes "
            "(e.g. the output of `openssl rand -hex 32`)"
        )
    return bytes(secret)


def redact(url: str) -> str:
    """``url`` with its password and secret-like query values replaced by ``***``; as given where
    it holds neither (rebuilt from its parts, ``memory://`` would come back as ``memory:``)."""
    try:
        parts = given = urlsplit(url)
        password = parts.password
        hosts = parts.netloc.rpartition("@")[2]
        cluster = "," in hosts or parts.scheme.lower().endswith("+cluster")  # host:port[,host:port...]
        port = None if cluster else parts.port
    except ValueError:
        return "<unparsable url>"
    if password is not None:
        user = parts.username or ""
        where = hosts if cluster else f"{parts.hostname or ''}" + (f":{port}" if port else "")
        parts = parts._replace(netloc=f"{user}:{REDACTED}@{where}")
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if any(name.lower() in SECRET_PARAMS for name, _ in pairs):
            query = "&".join(
                f"{quote(name)}={REDACTED if name.lower() in SECRET_PARAMS else quote(value, safe='/:,')}"
                for name, value in pairs
            )
            parts = parts._replace(query=query)
    return url if parts == given else urlunsplit(parts)


def url_secrets(url: str) -> list[str]:
    """The secret strings a URL holds (password, secret-like query values), raw and URL-quoted."""
    found: list[str] = []
    try:
        parts = urlsplit(url)
        if parts.password:
            found.append(unquote(parts.password))
            found.append(parts.password)
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name.lower() in SECRET_PARAMS and value:
                found += [value, quote(value, safe="")]
    except ValueError:
        pass
    return found


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each (non-empty) secret replaced by ``***``."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text
