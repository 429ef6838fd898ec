"""AES-256-GCM envelope encryption: payloads under data keys, data keys wrapped by a key-encryption key.

Only a `KeyProvider` ever sees the key-encryption key (KEK). The local provider keeps KEKs in one file
(mode 0600, created on first start); a cloud KMS slots in by implementing the same three members, and
every wrapped blob names the KEK that wrapped it, so KEK rotation never needs old blobs rewritten at
once. Data keys are destroyed (crypto-shredding) by deleting their wrapped form from the store.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .keyfile import create_private_file

NONCE_SIZE = 12
KEY_SIZE = 32
_WRAP_VERSION = 1


class KeyFileError(RuntimeError):
    """The key file is missing, unreadable, too permissive or malformed; the log must not run."""


class DecryptionError(ValueError):
    """A ciphertext or wrapped key does not decrypt: wrong key, wrong associated data, or tampering."""


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """nonce || AES-256-GCM(plaintext) || tag; a fresh random nonce per message (96 bits)."""
    nonce = os.urandom(NONCE_SIZE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, blob: bytes, aad: bytes) -> bytes:
    if len(blob) < NONCE_SIZE + 16:
        raise DecryptionError("ciphertext too short")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], aad)
    except InvalidTag:
        raise DecryptionError("ciphertext does not authenticate (wrong key or associated data)") from None


@runtime_checkable
class KeyProvider(Protocol):
    """Wraps and unwraps data keys with a key-encryption key the caller never sees."""

    @property
    def current_kek_id(self) -> str: ...

    def wrap(self, data_key: bytes, aad: bytes) -> bytes: ...

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes: ...


def _pack(kek_id: str, sealed: bytes) -> bytes:
    kid = kek_id.encode()
    return bytes([_WRAP_VERSION, len(kid)]) + kid + sealed


def _unpack(wrapped: bytes) -> tuple[str, bytes]:
    if len(wrapped) < 2 or wrapped[0] != _WRAP_VERSION or len(wrapped) < 2 + wrapped[1]:
        raise DecryptionError("wrapped key has an unknown format")
    n = wrapped[1]
    return wrapped[2 : 2 + n].decode(errors="replace"), wrapped[2 + n :]


def kek_id_of(wrapped: bytes) -> str:
    return _unpack(wrapped)[0]


class LocalKeyProvider:
    """KEKs in a JSON file `{"current": id, "keys": {id: base64 key}}`, mode 0600.

    Refuses to work when the file is missing (unless `create`), unreadable, malformed or readable by
    group/others: logging payloads under a key we cannot keep safe would defeat the encryption.
    """

    def __init__(self, path: Path, *, create: bool = False) -> None:
        self.path = path
        if not path.exists():
            if not create:
                raise KeyFileError(
                    f"key file {path} is missing; encrypted payloads cannot be read or written"
                )
            self._create()
        self._keys, self._current = self._load()

    def _create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        kid = secrets.token_hex(4)
        doc = {"current": kid, "keys": {kid: base64.b64encode(os.urandom(KEY_SIZE)).decode()}}
        # False: created concurrently by another worker, complete; load theirs
        create_private_file(self.path, json.dumps(doc).encode())

    def _load(self) -> tuple[dict[str, bytes], str]:
        try:
            mode = self.path.stat().st_mode
            raw = self.path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyFileError(f"cannot read key file {self.path}: {exc}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(f"key file {self.path} is accessible to group/others; chmod 600 it")
        try:
            doc = json.loads(raw)
            keys = {str(k): base64.b64decode(v, validate=True) for k, v in doc["keys"].items()}
            current = str(doc["current"])
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
            raise KeyFileError(f"key file {self.path} is malformed") from None
        if current not in keys or any(len(k) != KEY_SIZE for k in keys.values()):
            raise KeyFileError(f"key file {self.path} is malformed (bad key size or current id)")
        return keys, current

    @property
    def current_kek_id(self) -> str:
        return self._current

    def wrap(self, data_key: bytes, aad: bytes) -> bytes:
        return _pack(self._current, seal(self._keys[self._current], data_key, aad))

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        kid, sealed = _unpack(wrapped)
        key = self._keys.get(kid)
        if key is None:
            raise DecryptionError(f"data key was wrapped by KEK {kid!r}, which {self.path} does not hold")
        return unseal(key, sealed, aad)

    def rotate(self) -> str:
        """Add a new KEK and make it current; old KEKs stay so existing wrapped keys still open.

        Follow with `AuditLog.rewrap_data_keys()` to move every data key to the new KEK, after which
        old KEKs can be retired from the file.
        """
        kid = secrets.token_hex(4)
        while kid in self._keys:
            kid = secrets.token_hex(4)
        keys = dict(self._keys)
        keys[kid] = os.urandom(KEY_SIZE)
        doc = {"current": kid, "keys": {k: base64.b64encode(v).decode() for k, v in keys.items()}}
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._keys, self._current = keys, kid
        return kid
