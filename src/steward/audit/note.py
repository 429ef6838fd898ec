"""Checkpoints as C2SP signed notes (https://c2sp.org/signed-note, https://c2sp.org/tlog-checkpoint).

A checkpoint is the text

    <origin>\\n<tree size>\\n<base64 root hash>\\n

followed by a blank line and one signature line per signer, `— <key name> <base64(key hash || sig)>`,
where the key hash is the first 4 bytes of SHA-256(name || 0x0A || 0x01 || Ed25519 public key). The
format is what Go's `golang.org/x/mod/sumdb/note` and the transparency-dev witnesses read, so a
Steward checkpoint can be handed to existing tooling.

The signing key lives in `$STEWARD_DATA_DIR/keys/`: `checkpoint.key` (PKCS#8 PEM, mode 0600) and
`checkpoint.pub` (the note verifier key `<name>+<hex key hash>+<base64(0x01 || public key)>`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .keyfile import create_private_file

ALG_ED25519 = 0x01
SIG_PREFIX = "\u2014 "  # em dash + space
PRIVATE_NAME = "checkpoint.key"
PUBLIC_NAME = "checkpoint.pub"


class NoteError(ValueError):
    """A note or checkpoint is malformed, or its signature does not verify."""


class SigningKeyError(RuntimeError):
    """The checkpoint signing key is missing, unreadable or not an Ed25519 key."""


def _valid_name(name: str) -> bool:
    return bool(name) and not any(c.isspace() or c == "+" for c in name)


def key_hash(name: str, public: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([ALG_ED25519]) + public).digest()[:4]


@dataclass(frozen=True)
class Verifier:
    name: str
    public_key: Ed25519PublicKey

    @property
    def raw(self) -> bytes:
        return self.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def key_hash(self) -> bytes:
        return key_hash(self.name, self.raw)

    def vkey(self) -> str:
        """The verifier key string: `<name>+<hex key hash>+<base64(0x01 || key)>`."""
        blob = base64.b64encode(bytes([ALG_ED25519]) + self.raw).decode()
        return f"{self.name}+{self.key_hash.hex()}+{blob}"

    @classmethod
    def parse(cls, text: str) -> Verifier:
        """A verifier key string, or a PEM public key (named by the note's signature line later)."""
        text = text.strip()
        if text.startswith("-----BEGIN"):
            try:
                key = serialization.load_pem_public_key(text.encode())
            except ValueError as exc:
                raise NoteError(f"public key: not a PEM public key ({exc})") from None
            if not isinstance(key, Ed25519PublicKey):
                raise NoteError("public key: not an Ed25519 key")
            return cls("", key)
        parts = text.split("+", 2)  # the base64 key may itself contain "+"
        if len(parts) != 3 or not _valid_name(parts[0]):
            raise NoteError("public key: expected '<name>+<hex key hash>+<base64 key>' or a PEM key")
        name, hexhash, b64 = parts
        try:
            blob = base64.b64decode(b64, validate=True)
            want = bytes.fromhex(hexhash)
        except (binascii.Error, ValueError):
            raise NoteError("public key: bad hex or base64 in the verifier key") from None
        if len(blob) != 33 or blob[0] != ALG_ED25519:
            raise NoteError("public key: not an Ed25519 verifier key")
        v = cls(name, Ed25519PublicKey.from_public_bytes(blob[1:]))
        if v.key_hash != want:
            raise NoteError("public key: key hash does not match the key")
        return v

    def verify(self, note: str) -> Checkpoint:
        """Parse a signed checkpoint and check this key's signature on it."""
        text, sigs = split_note(note)
        name = self.name
        for sig_name, blob in sigs:
            if name and sig_name != name:
                continue
            if blob[:4] != key_hash(sig_name, self.raw):
                continue
            try:
                self.public_key.verify(blob[4:], text.encode())
            except InvalidSignature:
                raise NoteError(f"checkpoint signature by {sig_name!r} does not verify") from None
            return Checkpoint.parse_body(text)
        raise NoteError(f"checkpoint carries no signature by this public key ({self.name or 'PEM key'})")


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    note: str = ""  # the full signed note it was parsed from, when it was

    def body(self) -> str:
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n"

    @classmethod
    def parse_body(cls, text: str) -> Checkpoint:
        lines = text.split("\n")
        if len(lines) < 4 or lines[-1] != "":
            raise NoteError("checkpoint: expected origin, size and root lines ending in a newline")
        origin, size_s, root_s = lines[0], lines[1], lines[2]
        if not origin:
            raise NoteError("checkpoint: empty origin line")
        if not (size_s.isascii() and size_s.isdigit()) or (size_s != "0" and size_s.startswith("0")):
            raise NoteError(f"checkpoint: tree size {size_s!r} is not a decimal number")
        try:
            root = base64.b64decode(root_s, validate=True)
        except binascii.Error:
            raise NoteError("checkpoint: root hash is not base64") from None
        if len(root) != 32:
            raise NoteError(f"checkpoint: root hash is {len(root)} bytes, not 32")
        return cls(origin, int(size_s), root)


def split_note(note: str) -> tuple[str, list[tuple[str, bytes]]]:
    """(signed text, [(key name, key hash || signature)]) of a signed note."""
    if not note.endswith("\n"):
        raise NoteError("note: does not end in a newline (truncated?)")
    cut = note.rfind("\n\n")
    if cut < 0:
        raise NoteError("note: no blank line before the signatures")
    text, block = note[: cut + 1], note[cut + 2 :]
    sigs: list[tuple[str, bytes]] = []
    for line in block.splitlines():
        if not line.startswith(SIG_PREFIX):
            raise NoteError(f"note: malformed signature line {line[:40]!r}")
        fields = line[len(SIG_PREFIX) :].split(" ")
        if len(fields) != 2 or not _valid_name(fields[0]):
            raise NoteError(f"note: malformed signature line {line[:40]!r}")
        try:
            blob = base64.b64decode(fields[1], validate=True)
        except binascii.Error:
            raise NoteError("note: signature is not base64") from None
        if len(blob) < 5:
            raise NoteError("note: signature too short")
        sigs.append((fields[0], blob))
    if not sigs:
        raise NoteError("note: no signatures")
    return text, sigs


@dataclass(frozen=True)
class Signer:
    name: str
    private_key: Ed25519PrivateKey

    def __post_init__(self) -> None:
        if not _valid_name(self.name):
            raise ValueError(f"key name {self.name!r} must be non-empty without spaces or '+'")

    @property
    def verifier(self) -> Verifier:
        return Verifier(self.name, self.private_key.public_key())

    def sign(self, checkpoint: Checkpoint) -> str:
        text = checkpoint.body()
        sig = self.private_key.sign(text.encode())
        blob = base64.b64encode(self.verifier.key_hash + sig).decode()
        return f"{text}\n{SIG_PREFIX}{self.name} {blob}\n"


def default_name(key: Ed25519PrivateKey) -> str:
    """A log origin unique to the key, so two deployments never produce confusable checkpoints."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"steward/audit/{hashlib.sha256(raw).hexdigest()[:16]}"


def load_or_create_signer(keys_dir: Path, name: str | None = None, *, create: bool = True) -> Signer:
    """The checkpoint key from `keys_dir`, generated (0600) on first use when `create` is true.

    `name` (the note key name, also used as the checkpoint origin) defaults to `default_name(key)`.
    """
    priv = keys_dir / PRIVATE_NAME
    if not priv.exists():
        if not create:
            raise SigningKeyError(f"checkpoint signing key {priv} is missing")
        keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        if create_private_file(priv, pem):  # else another process won the race: use its key
            signer = Signer(name or default_name(key), key)
            (keys_dir / PUBLIC_NAME).write_text(signer.verifier.vkey() + "\n")
            return signer
    try:
        mode = priv.stat().st_mode
        data = priv.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read checkpoint signing key {priv}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SigningKeyError(f"checkpoint signing key {priv} is readable by others; chmod 600 it")
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"checkpoint signing key {priv} is not a usable PEM key ({exc})") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise SigningKeyError(f"checkpoint signing key {priv} is not an Ed25519 key")
    signer = Signer(name or default_name(loaded), loaded)
    pub = keys_dir / PUBLIC_NAME
    if not pub.exists():
        pub.write_text(signer.verifier.vkey() + "\n")
    return signer


def load_verifier(path: Path) -> Verifier:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SigningKeyError(f"cannot read public key {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise NoteError(f"public key {path}: not text") from None
    return Verifier.parse(text)
