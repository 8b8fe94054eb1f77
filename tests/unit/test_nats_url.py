"""NATS URLs are checked when a transport or a setting is built (a typo fails at once, not
after the connect timeout), and error messages never carry a URL's credentials."""

from __future__ import annotations

import pytest

from broker.errors import InvalidArgumentError
from broker.transport import NatsTransport, redact_credentials, validate_nats_url


@pytest.mark.parametrize("url", [
    "nats://127.0.0.1:4222", "tls://user:pw@nats.example:4443", "ws://h", "wss://h:443/",
    "localhost:4222",
])
def test_valid_urls_pass(url: str) -> None:
    assert validate_nats_url(url) == url


@pytest.mark.parametrize(("url", "why"), [
    ("nats//localhost:4222", "unexpected"),
    ("nats:/localhost", "unexpected"),
    ("nats://localhost:42x2", "Port"),
    ("nats://localhost:99999", "Port"),
    ("nats://localhost:0", "port 0"),
    ("http://localhost:4222", "scheme 'http'"),
    ("nats://:4222", "no host"),
    ("nats://h:4222?x=1", "unexpected"),
    ("", "empty"),
])
def test_typos_are_refused(url: str, why: str) -> None:
    with pytest.raises(InvalidArgumentError, match=why):
        validate_nats_url(url)


def test_transport_refuses_a_bad_url_when_built() -> None:
    with pytest.raises(InvalidArgumentError, match="invalid NATS URL"):
        NatsTransport(["nats://127.0.0.1:4222", "nats//x"], name="t")


def test_credentials_are_redacted() -> None:
    text = "connect to ['nats://alice:s3cret@h:4222', 'tls://tok3n@h'] failed"
    out = redact_credentials(text)
    assert "s3cret" not in out
    assert "tok3n" not in out
    assert "nats://***@h:4222" in out
    with pytest.raises(InvalidArgumentError) as info:
        validate_nats_url("nats://alice:s3cret@h:4x")
    assert "s3cret" not in str(info.value)
