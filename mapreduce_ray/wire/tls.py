"""TLS for an endpoint: its certificate, the key digest announced on chain, and the pin a caller checks.

An endpoint with `wire.tls_cert`/`wire.tls_key` serves grpc+tls and announces, beside its address, the
SHA-256 of its certificate's public key (SubjectPublicKeyInfo, DER): 32 bytes, within the 64 the chain's
neuron certificate holds, and unchanged when the operator renews the certificate with the same key. A
caller fetches the certificate the endpoint presents, compares its key digest with the chain's, and then
trusts only that certificate for the connection (gRPC has no verifier hook: the pinned certificate is the
connection's only root). Certificates name the host TLS_NAME, whatever address serves them.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import select
import socket
import ssl
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mapreduce_ray.chain import Chain
from mapreduce_ray.errors import CertificateMismatchError, EndpointError
from mapreduce_ray.wire.config import WireConfig

TLS_NAME = "mapreduce-ray"
CERTIFICATE_DAYS = 365


def key_fingerprint(pem: bytes) -> str:
    """Hex SHA-256 of the public key (SubjectPublicKeyInfo, DER) of the PEM certificate `pem`."""
    return hashlib.sha256(_spki(x509.load_pem_x509_certificate(pem).public_key())).hexdigest()


def _spki(public_key) -> bytes:
    """A public key as DER SubjectPublicKeyInfo: what the announced digest covers."""
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def check_certificate(cert_path: str, key_path: str) -> None:
    """One line naming the fix (ValueError) unless the files are a certificate callers can pin, valid now and
    naming TLS_NAME, and its private key."""
    fix = "make one with python -m jobs.certificate cert=PATH key=PATH"
    try:
        with open(cert_path, "rb") as cert_file, open(key_path, "rb") as key_file:
            certificate = x509.load_pem_x509_certificate(cert_file.read())
            key = serialization.load_pem_private_key(key_file.read(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"wire.tls_cert/wire.tls_key: cannot read a certificate and its key ({e}); {fix}") from None
    now = datetime.datetime.now(datetime.timezone.utc)
    if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        raise ValueError(
            f"{cert_path} is valid from {certificate.not_valid_before_utc:%Y-%m-%d} to "
            f"{certificate.not_valid_after_utc:%Y-%m-%d}, not now; {fix}"
        )
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = []
    if TLS_NAME not in [n.value for n in names if isinstance(n, x509.DNSName)]:
        raise ValueError(f"{cert_path} does not name {TLS_NAME} (callers ask for that name); {fix}")
    if _spki(key.public_key()) != _spki(certificate.public_key()):
        raise ValueError(f"{key_path} is not the private key of {cert_path}; pass the pair, or {fix}")


def announce_address(chain: Chain, keypair, endpoint: str, wire: WireConfig) -> None:
    """Announce `endpoint` (host:port) for `keypair`'s hotkey, with its certificate's key digest under TLS."""
    fingerprint = None
    if wire.tls:
        with open(wire.tls_cert, "rb") as cert:
            fingerprint = key_fingerprint(cert.read())
    chain.serve(keypair, endpoint, fingerprint)


def pinned_certificate(who: str, address: str, fingerprint: str, timeout_s: float) -> bytes:
    """The PEM certificate `who` serves at `address` (host:port), once its key digest is `fingerprint`; the
    handshake that fetches it ends within `timeout_s`, however slowly the endpoint answers."""
    host, _, port = address.rpartition(":")
    try:
        pem = _presented_certificate(host.strip("[]"), int(port), time.monotonic() + timeout_s)
        served = key_fingerprint(pem)
    except TimeoutError:
        raise EndpointError(f"{who} did not finish a TLS handshake at {address} within {timeout_s:g} s") from None
    except (OSError, ValueError) as e:
        raise EndpointError(f"{who} cannot be reached over TLS at {address}: {' '.join(str(e).split())}") from None
    if served != fingerprint:
        raise CertificateMismatchError(
            f"{who} at {address} serves a TLS key (sha256 {served[:16]}...) other than the one its hotkey "
            f"announced on chain (sha256 {fingerprint[:16]}...): refusing to connect"
        )
    return pem


def _presented_certificate(host: str, port: int, deadline: float) -> bytes:
    """The PEM certificate the TLS server at (host, port) presents, unverified (the caller pins it), by
    `deadline` (time.monotonic)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection((host, port), timeout=max(deadline - time.monotonic(), 0.001)) as raw:
        raw.setblocking(False)
        with context.wrap_socket(raw, server_hostname=TLS_NAME, do_handshake_on_connect=False) as tls:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    readable, writable = [tls], []
                except ssl.SSLWantWriteError:
                    readable, writable = [], [tls]
                left = deadline - time.monotonic()
                if left <= 0 or not any(select.select(readable, writable, [], left)):
                    raise TimeoutError
            return ssl.DER_cert_to_PEM_cert(tls.getpeercert(binary_form=True)).encode()


def create_certificate(cert_path: str, key_path: str) -> str:
    """Write a new self-signed certificate for TLS_NAME and its private key (owner-only); return the key's
    digest. Refuses to overwrite either file."""
    for path in (cert_path, key_path):
        if os.path.exists(path):
            raise FileExistsError(f"{path} exists; remove it, or pass other paths, to make a new certificate")
    now = datetime.datetime.now(datetime.timezone.utc)
    pem, secret = self_signed(
        TLS_NAME, now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=CERTIFICATE_DAYS)
    )
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(secret)
    with open(cert_path, "xb") as out:
        out.write(pem)
    return key_fingerprint(pem)


def self_signed(name: str, valid_from: datetime.datetime, valid_until: datetime.datetime) -> tuple[bytes, bytes]:
    """(certificate, private key), both PEM: a new P-256 key and a certificate for host `name`, signed by
    itself and valid between the two times."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_until)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pkcs8 = serialization.PrivateFormat.PKCS8
    secret = key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption())
    return certificate.public_bytes(serialization.Encoding.PEM), secret
