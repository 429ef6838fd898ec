"""Tamper-evident audit log: RFC 9162 Merkle tree, C2SP signed checkpoints, encrypted payloads.

The gateway builds an `AuditEvent` per request, appends it through a `GroupCommitter` (awaiting the
receipt before responding), and serves proofs and payloads through `AuditLog`. See `log.py` for how
leaves are sequenced and `verify.py` for what `steward audit verify` checks.
"""

from steward.audit.crypto import DecryptionError, KeyFileError, KeyProvider, LocalKeyProvider
from steward.audit.events import AuditEvent, EventError, Finding, Principal, StoredEvent
from steward.audit.export import ExportError, export_events, verify_export
from steward.audit.keyring import PayloadUnavailable
from steward.audit.log import AuditError, AuditLog, GroupCommitter, InclusionProof, Receipt
from steward.audit.merkle import ProofError
from steward.audit.note import Checkpoint, NoteError, SigningKeyError, Verifier, load_verifier
from steward.audit.verify import VerifyReport, verify_store

__all__ = [
    "AuditError",
    "AuditEvent",
    "AuditLog",
    "Checkpoint",
    "DecryptionError",
    "EventError",
    "ExportError",
    "Finding",
    "GroupCommitter",
    "InclusionProof",
    "KeyFileError",
    "KeyProvider",
    "LocalKeyProvider",
    "NoteError",
    "PayloadUnavailable",
    "Principal",
    "ProofError",
    "Receipt",
    "SigningKeyError",
    "StoredEvent",
    "Verifier",
    "VerifyReport",
    "export_events",
    "load_verifier",
    "verify_export",
    "verify_store",
]
