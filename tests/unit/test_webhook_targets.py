"""Webhook rules without a database: which addresses are public, URL form, signatures, backoff, pinning."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

import httpx
import pytest

from jobs.webhook_sending import retry_delay_s
from jobs.webhook_targets import (
    PrivateTarget,
    checked_address,
    is_public,
    pinned_request,
    signature,
    url_form_problem,
)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.215.14", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.16.5.4", False),
        ("192.168.1.1", False),
        ("100.64.0.1", False),  # shared address space (carrier NAT, tailnets)
        ("169.254.169.254", False),  # cloud metadata
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("192.0.2.1", False),  # documentation
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("::ffff:10.0.0.1", False),
    ],
)
def test_only_public_addresses_are_public(address: str, public: bool) -> None:
    assert is_public(ipaddress.ip_address(address)) is public


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://hooks.example.com/a?b=1", None),
        ("http://user:pw@hooks.example.com:8080/", None),
        ("ftp://example.com/", "http or https"),
        ("example.com/hook", "http or https"),
        ("https:///hook", "needs a host"),
        ("https://example.com:70000/", "not a valid URL"),
        ("https://example.com/\r\nX-Injected: 1", "control characters"),
        ("https://exa mple.com/", "spaces"),
    ],
)
def test_webhook_url_form(url: str, problem: str | None) -> None:
    found = url_form_problem(url)
    assert found is None if problem is None else problem in (found or "")


def test_a_literal_private_address_is_refused_and_allowed_only_by_the_setting() -> None:
    with pytest.raises(PrivateTarget, match="WEBHOOK_ALLOW_PRIVATE"):
        checked_address("http://127.0.0.1:8080/hook", allow_private=False)
    assert checked_address("http://127.0.0.1:8080/hook", allow_private=True) == ipaddress.ip_address(
        "127.0.0.1"
    )


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b'{"batch_id":"x"}'
    expected = hmac.new(b"s3cret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert signature(body, secret="s3cret", timestamp=1700000000) == f"sha256={expected}"
    assert signature(body, secret="s3cret", timestamp=1700000001) != f"sha256={expected}"


def test_backoff_doubles_is_capped_and_jittered_in_its_upper_half() -> None:
    assert [retry_delay_s(n, base_s=5, max_s=3600, rand=lambda: 1.0) for n in (1, 2, 3, 4)] == [5, 10, 20, 40]
    assert [retry_delay_s(n, base_s=5, max_s=3600, rand=lambda: 0.0) for n in (1, 2, 3, 4)] == [
        2.5,
        5,
        10,
        20,
    ]
    assert retry_delay_s(30, base_s=5, max_s=3600, rand=lambda: 1.0) == 3600
    assert retry_delay_s(10_000, base_s=5, max_s=60, rand=lambda: 0.5) == 45
    assert retry_delay_s(3, base_s=0, max_s=60) == 0


def test_a_request_goes_to_the_checked_address_with_the_urls_host_name() -> None:
    with httpx.Client() as client:
        secure = pinned_request(
            client,
            url="https://hooks.example.com:8443/in?x=1",
            address=ipaddress.ip_address("2606:4700:4700::1111"),
            body=b"{}",
            headers={"X-Nightrender-Delivery": "d"},
        )
        plain = pinned_request(
            client,
            url="http://hooks.example.com/in",
            address=ipaddress.ip_address("93.184.215.14"),
            body=b"{}",
            headers={},
        )
    assert str(secure.url) == "https://[2606:4700:4700::1111]:8443/in?x=1"
    assert secure.headers["host"] == "hooks.example.com:8443"
    assert secure.extensions["sni_hostname"] == "hooks.example.com"
    assert secure.headers["x-nightrender-delivery"] == "d"
    assert str(plain.url) == "http://93.184.215.14/in"
    assert plain.headers["host"] == "hooks.example.com"
    assert "sni_hostname" not in plain.extensions
