"""Ed25519 keys of the fleet: this member's private key (a PEM file), everyone's public keys
(base64 of the 32 raw bytes, in the configuration)."""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class FleetKeyError(Exception):
    """A key file or public key that cannot be used; the message says which and why."""


def generate(path: Path) -> str:
    """A new private key written to `path` (mode 0600, never over an existing file); returns
    its public key for the fleet's configuration."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise FleetKeyError(f"{path} exists already; not overwriting a key") from None
    except OSError as exc:
        raise FleetKeyError(f"{path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    return public_text(key.public_key())


def load_private(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FleetKeyError(f"fleet.private_key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise FleetKeyError(f"fleet.private_key {path}: not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise FleetKeyError(f"fleet.private_key {path}: not an Ed25519 key")
    return key


def public_text(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def load_public(text: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError):
        raise FleetKeyError(
            f"{text[:60]!r} is not an Ed25519 public key (base64, 32 bytes)"
        ) from None


def verify(key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True
