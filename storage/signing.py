"""Ed25519 signatures on release files: who made a release (not whether its maker was honest).

A signature is made with the custodian's private key over

    SIGNATURE_CONTEXT || signer_name (UTF-8) || 0x00 || metadata_json (UTF-8)

and `metadata_json` already records every array's SHA-256, the relation, sensitivities, noise
multipliers and epsilon. A valid signature by a trusted key therefore proves that the holder of
that key produced exactly this metadata and these arrays (any change to one byte of either breaks
it). It does NOT prove that the noise was really drawn, that the norm bounds were enforced, or that
the data set is what the metadata says: that rests on the signer running this code honestly. The
epsilon a release claims is checked separately on every read (`storage.release`), signed or not.

Keys (library: `cryptography`, Ed25519, RFC 8032):
    private key: PEM, PKCS#8, unencrypted, written with mode 0600 (protect it like an SSH key);
    public key:  PEM, SubjectPublicKeyInfo;
    fingerprint: "sha256:" + hex SHA-256 of the 32 raw public-key bytes (64 hex digits).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mepf_core.errors import InvalidArgumentError, MepfError, PathExistsError, PathNotFoundError

SIGNATURE_CONTEXT = b"dp-mepf release signature v1\x00"
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32
MAX_SIGNER_NAME = 200
_MAX_KEY_FILE_BYTES = 64 * 1024  # a PEM Ed25519 key is ~120 bytes; refuse to read anything large


class SigningKeyError(MepfError, ValueError):
    """A key file is missing, unreadable, not Ed25519, or (private key) readable by others."""


@dataclass(frozen=True)
class KeyPairPaths:
    private: Path
    public: Path
    fingerprint: str


def fingerprint(public_key: Ed25519PublicKey) -> str:
    """"sha256:" + 64 hex digits: the SHA-256 of the key's 32 raw bytes."""
    return "sha256:" + hashlib.sha256(public_key_bytes(public_key)).hexdigest()


def public_key_bytes(public_key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of an Ed25519 public key (RFC 8032 encoding)."""
    return public_key.public_bytes(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)


def public_key_from_bytes(raw: bytes) -> Ed25519PublicKey:
    """Inverse of `public_key_bytes`; raises SigningKeyError unless `raw` is 32 valid bytes."""
    if len(raw) != PUBLIC_KEY_BYTES:
        raise SigningKeyError(f"an Ed25519 public key has {PUBLIC_KEY_BYTES} bytes, got {len(raw)}")
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SigningKeyError(f"not a valid Ed25519 public key ({type(exc).__name__})") from None


def validate_signer_name(name: str | None) -> str:
    """The signer's display name ('' when none): printable, no NUL, at most 200 characters."""
    if name is None:
        return ""
    if not isinstance(name, str) or len(name) > MAX_SIGNER_NAME or not name.isprintable():
        raise InvalidArgumentError(f"signer name must be printable text of at most {MAX_SIGNER_NAME} characters, got {name!r}")
    return name


def signed_message(metadata_json: str, signer_name: str) -> bytes:
    """The exact bytes a release signature covers (see the module docstring)."""
    return SIGNATURE_CONTEXT + signer_name.encode("utf-8") + b"\x00" + metadata_json.encode("utf-8")


def sign(private_key: Ed25519PrivateKey, metadata_json: str, signer_name: str = "") -> bytes:
    """64-byte Ed25519 signature of `signed_message(metadata_json, signer_name)`."""
    return private_key.sign(signed_message(metadata_json, validate_signer_name(signer_name)))


def verify(public_key: Ed25519PublicKey, signature: bytes, metadata_json: str, signer_name: str) -> bool:
    """True when `signature` is `public_key`'s signature of this metadata and signer name."""
    try:
        public_key.verify(signature, signed_message(metadata_json, signer_name))
    except InvalidSignature:
        return False
    return True


def _read_key_file(path: str | os.PathLike, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise SigningKeyError(f"{what} file {p} does not exist")
    if p.stat().st_size > _MAX_KEY_FILE_BYTES:
        raise SigningKeyError(f"{what} file {p} is too large to be an Ed25519 key")
    return p.read_bytes()


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """Load a PEM (PKCS#8, unencrypted) Ed25519 private key written by `generate_keypair`.

    Raises SigningKeyError if the file is missing, not an Ed25519 private key, or readable or
    writable by group or others (like ssh, a private key others can read is refused).
    """
    p = Path(path)
    data = _read_key_file(p, "signing key")
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077:
        raise SigningKeyError(f"signing key {p} is accessible by others (mode {mode:04o}); run `chmod 600 {p}`")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SigningKeyError(f"signing key {p} is not an unencrypted PEM private key ({type(exc).__name__})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"signing key {p} is a {type(key).__name__}, not an Ed25519 key")
    return key


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    """Load a PEM (SubjectPublicKeyInfo) Ed25519 public key; raises SigningKeyError otherwise."""
    p = Path(path)
    data = _read_key_file(p, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SigningKeyError(f"public key {p} is not a PEM public key ({type(exc).__name__})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"public key {p} is a {type(key).__name__}, not an Ed25519 key")
    return key


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` exclusively with `mode` (never overwrites; FileExistsError if it exists)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; never widened beyond `mode`
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException as exc:  # a full disk...: no partial key is left (it would block the next keygen)
        os.close(fd)
        path.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = os.fspath(path)  # os.write names no file: the message should
        raise
    os.close(fd)


def default_public_path(private_path: str | os.PathLike) -> Path:
    """custodian.key -> custodian.pub (the public key sits next to the private one)."""
    return Path(private_path).with_suffix(".pub")


def generate_keypair(private_path: str | os.PathLike, public_path: str | os.PathLike | None = None) -> KeyPairPaths:
    """Write a new Ed25519 key pair: private key (mode 0600) and public key (mode 0644).

    Neither file may exist (FileExistsError); the folder must exist (FileNotFoundError). If the
    public key cannot be written, the new private key is removed again.
    """
    private = Path(private_path)
    public = Path(public_path) if public_path is not None else default_public_path(private)
    if private.resolve() == public.resolve():
        raise InvalidArgumentError(f"private and public key paths must differ, both are {private}")
    for p in (private, public):
        if not p.parent.resolve().is_dir():
            raise PathNotFoundError(f"key folder {p.parent} does not exist")
        if p.exists() or p.is_symlink():
            raise PathExistsError(f"{p} already exists; keys are never overwritten")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(encoding=serialization.Encoding.PEM, format=serialization.PrivateFormat.PKCS8,
                            encryption_algorithm=serialization.NoEncryption())
    pub_pem = key.public_key().public_bytes(encoding=serialization.Encoding.PEM,
                                            format=serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(private, pem, 0o600)
    try:
        _write_new(public, pub_pem, 0o644)
    except BaseException:
        private.unlink(missing_ok=True)
        raise
    return KeyPairPaths(private, public, fingerprint(key.public_key()))
