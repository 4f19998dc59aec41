"""Signed releases (issue 11, item 5): who made a release, checked against trusted public keys."""

from __future__ import annotations

import hashlib
import json
import os
import stat

import h5py
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PrivateKey
from prefect.logging import disable_run_logger

from flows.cli import main
from storage import signing
from storage.release import (SIGNATURE_ATTRS, ReleaseClaimError, ReleaseSignatureError, ReleaseUntrustedError,
                             embedding_to_release, read_release)
from storage.signing import SigningKeyError, generate_keypair, load_private_key, load_public_key
from tests.test_release_verify import exact_sums_tiny_sigma, honest_metadata


@pytest.fixture
def keys(tmp_path):
    """Two custodians' key pairs: (private, public) paths for 'alice' and 'mallory'."""
    alice = generate_keypair(tmp_path / "alice.key")
    mallory = generate_keypair(tmp_path / "mallory.key", tmp_path / "mallory-public.pem")
    return {"alice": alice, "mallory": mallory}


def _signed(path, key_path, name="alice@custodian"):
    meta, noisy = honest_metadata()
    embedding_to_release(path, meta, noisy, signing_key=load_private_key(key_path), signer_name=name)
    return meta, noisy


def test_keygen_writes_a_private_key_only_its_owner_can_read_and_never_overwrites(tmp_path, keys):
    alice = keys["alice"]
    assert alice.public == tmp_path / "alice.pub"
    assert stat.S_IMODE(os.stat(alice.private).st_mode) == 0o600
    assert alice.fingerprint.startswith("sha256:") and len(alice.fingerprint) == len("sha256:") + 64
    assert signing.fingerprint(load_public_key(alice.public)) == alice.fingerprint
    assert signing.fingerprint(load_private_key(alice.private).public_key()) == alice.fingerprint
    assert alice.fingerprint != keys["mallory"].fingerprint
    before = alice.private.read_bytes()
    with pytest.raises(FileExistsError, match="never overwritten"):
        generate_keypair(alice.private)
    assert alice.private.read_bytes() == before


def test_unusable_keys_are_refused_by_name(tmp_path, keys):
    os.chmod(keys["alice"].private, 0o644)
    with pytest.raises(SigningKeyError, match=r"accessible by others \(mode 0644\); run `chmod 600"):
        load_private_key(keys["alice"].private)
    other = Ed448PrivateKey.generate()
    (tmp_path / "ed448.pub").write_bytes(other.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(SigningKeyError, match="not an Ed25519 key"):
        load_public_key(tmp_path / "ed448.pub")
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(SigningKeyError, match="not a PEM public key"):
        load_public_key(tmp_path / "junk.pub")
    with pytest.raises(SigningKeyError, match="does not exist"):
        load_public_key(tmp_path / "missing.pub")


def test_a_signed_release_says_who_signed_it_and_is_checked_against_trusted_keys(tmp_path, keys):
    alice, mallory = keys["alice"], keys["mallory"]
    meta, _ = _signed(tmp_path / "r.h5", alice.private)
    rel = read_release(tmp_path / "r.h5")  # no trusted key required: readable, signature still verified
    assert rel.signature.as_dict() == {"signed": True, "valid": True, "fingerprint": alice.fingerprint,
                                       "signer": "alice@custodian", "trusted": None}
    assert read_release(tmp_path / "r.h5", trusted_keys=[alice.public]).signature.trusted is True
    assert read_release(tmp_path / "r.h5", trusted_keys=[mallory.public, alice.public]).signature.trusted is True
    with pytest.raises(ReleaseUntrustedError, match=f"signed by {alice.fingerprint} \\(alice@custodian\\), "
                                                    "which is not a trusted key"):
        read_release(tmp_path / "r.h5", trusted_keys=mallory.public)

    meta_u, noisy = honest_metadata()
    embedding_to_release(tmp_path / "u.h5", meta_u, noisy)
    assert read_release(tmp_path / "u.h5").signature.as_dict()["signed"] is False  # unsigned stays readable
    with pytest.raises(ReleaseUntrustedError, match="is not signed, and a signature by a trusted key is required"):
        read_release(tmp_path / "u.h5", trusted_keys=[alice.public])


@pytest.mark.parametrize("tamper,error,message", [
    # metadata changed (claim still valid) and its SHA-256 recomputed: only the signature catches it
    (lambda f: _rewrite_metadata(f, dataset_id="someone-else"), ReleaseSignatureError, "does not verify"),
    (lambda f: f.attrs.__setitem__("signer_name", "bob"), ReleaseSignatureError, "does not verify"),
    (lambda f: f.attrs.__delitem__("signer_fingerprint"), ReleaseSignatureError, "incomplete signature"),
    (lambda f: f.attrs.__setitem__("signer_fingerprint", "sha256:" + "0" * 64), ReleaseSignatureError,
     "not the fingerprint of the embedded key"),
    (lambda f: f.attrs.__setitem__("signature", "zz"), ReleaseSignatureError, "malformed signature"),
    # a name `mepf inspect` would print raw: terminal escape sequences are refused before verifying
    (lambda f: f.attrs.__setitem__("signer_name", "alice\x1b]0;pwned\x07"), ReleaseSignatureError,
     "signer name must be printable text"),
])
def test_changes_after_signing_are_caught(tmp_path, keys, tamper, error, message):
    _signed(tmp_path / "r.h5", keys["alice"].private)
    with h5py.File(tmp_path / "r.h5", "r+") as f:
        tamper(f)
    with pytest.raises(error, match=message):
        read_release(tmp_path / "r.h5")


def _rewrite_metadata(f, **changes):
    d = json.loads(f.attrs["metadata_json"])
    d.update(changes)
    text = json.dumps(d, sort_keys=True)
    f.attrs["metadata_json"] = text
    f.attrs["metadata_sha256"] = hashlib.sha256(text.encode()).hexdigest()


def test_a_forger_can_strip_or_resign_but_not_pass_a_trusted_key(tmp_path, keys):
    alice, mallory = keys["alice"], keys["mallory"]
    _signed(tmp_path / "r.h5", alice.private)
    with h5py.File(tmp_path / "r.h5", "r+") as f:  # re-signed by mallory over changed metadata
        _rewrite_metadata(f, dataset_id="forged")
        text = f.attrs["metadata_json"]
        key = load_private_key(mallory.private)
        f.attrs["signature"] = signing.sign(key, text, "alice@custodian").hex()
        f.attrs["signer_public_key"] = signing.public_key_bytes(key.public_key()).hex()
        f.attrs["signer_fingerprint"] = signing.fingerprint(key.public_key())
    assert read_release(tmp_path / "r.h5").signature.fingerprint == mallory.fingerprint  # says who, truly
    with pytest.raises(ReleaseUntrustedError, match=f"signed by {mallory.fingerprint}"):
        read_release(tmp_path / "r.h5", trusted_keys=[alice.public])
    with h5py.File(tmp_path / "r.h5", "r+") as f:
        for name in SIGNATURE_ATTRS:
            del f.attrs[name]
    with pytest.raises(ReleaseUntrustedError, match="is not signed"):
        read_release(tmp_path / "r.h5", trusted_keys=[alice.public])


def test_a_signature_does_not_make_a_false_claim_true(tmp_path, keys):
    """A trusted key proves who made a release, not that it is private: the claim is checked anyway."""
    exact_sums_tiny_sigma(tmp_path / "f.h5")
    key = load_private_key(keys["alice"].private)
    with h5py.File(tmp_path / "f.h5", "r+") as f:
        text = f.attrs["metadata_json"]
        f.attrs["signature"] = signing.sign(key, text, "").hex()
        f.attrs["signer_public_key"] = signing.public_key_bytes(key.public_key()).hex()
        f.attrs["signer_fingerprint"] = signing.fingerprint(key.public_key())
        f.attrs["signer_name"] = ""
    with pytest.raises(ReleaseClaimError, match="epsilon cannot be recomputed"):
        read_release(tmp_path / "f.h5", trusted_keys=[keys["alice"].public])


def test_load_release_task_enforces_trusted_keys(tmp_path, keys):
    from tasks.public import load_release_task

    meta, _ = _signed(tmp_path / "r.h5", keys["alice"].private)
    with disable_run_logger():
        assert load_release_task.fn(str(tmp_path / "r.h5"), (str(keys["alice"].public),)).metadata == \
            read_release(tmp_path / "r.h5").metadata
        with pytest.raises(ReleaseUntrustedError):
            load_release_task.fn(str(tmp_path / "r.h5"), (str(keys["mallory"].public),))


def test_cli_keygen_inspect_and_train_with_trusted_keys(tmp_path, keys, capsys):
    assert main(["keygen", "--out", str(tmp_path / "custodian.key"), "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["public_key"] == str(tmp_path / "custodian.pub")
    assert stat.S_IMODE(os.stat(tmp_path / "custodian.key").st_mode) == 0o600
    assert main(["keygen", "--out", str(tmp_path / "custodian.key")]) == 2
    assert "already exists; keys are never overwritten" in capsys.readouterr().err

    _signed(tmp_path / "r.h5", tmp_path / "custodian.key", name="hospital A")
    assert main(["inspect", str(tmp_path / "r.h5"), "--json", "--trusted-key", str(tmp_path / "custodian.pub")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["signature"] == {"signed": True, "valid": True, "fingerprint": made["fingerprint"],
                                "signer": "hospital A", "trusted": True}
    assert out["claim"]["verified"] is True and out["claim"]["epsilon_recomputed"] == out["epsilon"]
    assert main(["inspect", str(tmp_path / "r.h5")]) == 0
    text = capsys.readouterr().out
    assert f"signature: valid, by key {made['fingerprint']} (hospital A)" in text
    assert "matches the recorded epsilon" in text

    assert main(["inspect", str(tmp_path / "r.h5"), "--trusted-key", str(keys["alice"].public)]) == 2
    assert "ReleaseUntrustedError" in capsys.readouterr().err
    assert main(["train", "--release", str(tmp_path / "r.h5"), "--out", str(tmp_path / "run"), "--steps", "1",
                 "--device", "cpu", "--trusted-key", str(keys["alice"].public)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mepf train")]
    assert err and "ReleaseUntrustedError" in err[0] and made["fingerprint"] in err[0]
    assert main(["train", "--release", str(tmp_path / "r.h5"), "--out", str(tmp_path / "run"),
                 "--trusted-key", str(tmp_path / "missing.pub")]) == 2
    err = capsys.readouterr().err
    assert "trusted_keys" in err and "public key file" in err and "missing.pub does not exist" in err


def test_cli_release_signs_with_the_custodians_key(tmp_path, capsys):
    key = generate_keypair(tmp_path / "custodian.key")
    args = ["release", "--dataset", "fashion-mnist", "--target-epsilon", "1", "--out", str(tmp_path / "r.h5"),
            "--labelled", "--neighbouring", "replace-one", "--limit", "60", "--batch-size", "60",
            "--signing-key", str(key.private), "--signer-name", "hospital A", "--json"]
    os.chmod(key.private, 0o640)  # a key others can read is refused before any work
    assert main(args) == 2
    assert "accessible by others" in capsys.readouterr().err and not (tmp_path / "r.h5").exists()
    os.chmod(key.private, 0o600)
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["signed_by"] == key.fingerprint
    rel = read_release(tmp_path / "r.h5", trusted_keys=[key.public])
    assert rel.signature.signer == "hospital A" and rel.metadata.release_id == out["release_id"]
