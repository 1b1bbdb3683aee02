"""Where a webhook may go and how it is signed: URL form, public addresses only, HMAC headers."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

import httpx

MAX_URL_LENGTH = 2000
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class TargetRefused(ValueError):
    """A webhook URL that may not be used; the message says why."""


class UnresolvableTarget(TargetRefused):
    """The URL's host does not resolve (at send time this may pass: it is retried)."""


class PrivateTarget(TargetRefused):
    """The URL's host resolves to an address that is not public."""


def url_form_problem(url: str) -> str | None:
    """What is wrong with a webhook URL's form (scheme, host, port, characters), or None."""
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        return "webhook_url must not contain spaces or control characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - reading it validates the port
    except ValueError:
        return "webhook_url is not a valid URL"
    if parts.scheme not in ("http", "https"):
        return "webhook_url must be an http or https URL"
    if not parts.hostname:
        return "webhook_url needs a host"
    return None


def is_public(address: IPAddress) -> bool:
    """Whether an address is on the public internet: not loopback, private, link-local, multicast,
    reserved, unspecified, nor any other special range (shared 100.64/10, documentation, ...)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    special = (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )
    return not special and address.is_global


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address the host resolves to, in the resolver's order, without repeats."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def checked_address(url: str, *, allow_private: bool) -> IPAddress:
    """The address to connect to for this URL; raises if its host does not resolve, or if any address
    it resolves to is not public (unless allowed)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = resolve(parts.hostname or "", port)
    except (OSError, UnicodeError, ValueError):
        addresses = []
    if not addresses:
        raise UnresolvableTarget("webhook_url's host does not resolve")
    private = [address for address in addresses if not is_public(address)]
    if private and not allow_private:
        raise PrivateTarget(
            f"webhook_url resolves to a non-public address ({private[0]}); "
            "the server allows that only with WEBHOOK_ALLOW_PRIVATE=true"
        )
    return addresses[0]


def pinned_request(
    client: httpx.Client, *, url: str, address: IPAddress, body: bytes, headers: dict[str, str]
) -> httpx.Request:
    """A POST to the checked address itself, so a DNS answer that changes after the check cannot
    redirect it; the Host header and TLS name (SNI and certificate check) stay the URL's host."""
    original = httpx.URL(url)
    extensions: dict[str, Any] = {}
    if original.scheme == "https":
        extensions["sni_hostname"] = original.raw_host.decode("ascii")
    return client.build_request(
        "POST",
        original.copy_with(host=str(address)),
        content=body,
        headers={**headers, "Host": original.netloc.decode("ascii")},
        extensions=extensions,
    )


def signature(body: bytes, *, secret: str, timestamp: int) -> str:
    """`sha256=` and the hex HMAC-SHA256 of `<timestamp>.<body>` under the secret."""
    message = str(timestamp).encode() + b"." + body
    return "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signed_headers(body: bytes, *, secret: str, timestamp: int, delivery_id: str) -> dict[str, str]:
    """The headers that let a receiver check who sent a delivery, when, and which one it is."""
    return {
        "Content-Type": "application/json",
        "X-Nightrender-Signature": signature(body, secret=secret, timestamp=timestamp),
        "X-Nightrender-Timestamp": str(timestamp),
        "X-Nightrender-Delivery": delivery_id,
    }
