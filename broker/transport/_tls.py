"""TLS material for NATS: a local certificate authority, its leaf certificates, and the client
``ssl.SSLContext`` worknode connects with.

The local CA is for the embedded default (``worknode up``, tests, the chaos harness): a
throw-away authority that lives in one directory on this machine and signs certificates only
for loopback names. A real deployment brings its own CA and files; ``TlsFiles`` describes
either.

Invariants:

- Keys are EC P-256 (accepted by nats-server's Go TLS stack and by OpenSSL alike); signatures
  ECDSA with SHA-256.
- The CA certificate carries name constraints: it can only vouch for the ``hosts`` it was
  created for (by default ``127.0.0.1``, ``::1`` and ``localhost``). A leaked local CA key
  therefore cannot be used to impersonate any other host, even to a client that trusts it.
- Validity: the CA 10 years (``CA_VALIDITY``), leaves about a year (``LEAF_VALIDITY``).
  ``issue()`` renews a leaf with less than ``RENEW_BEFORE`` left; a CA that has expired (or
  will within ``RENEW_BEFORE``) is recreated, which invalidates every leaf it signed.
- Idempotent and safe across processes (a lock file per directory): ``create_local_ca``
  and ``LocalCA.issue`` reuse existing files when they are valid (a key matching its
  certificate, a leaf signed by this CA covering the requested hosts and usages, not about
  to expire), so a restart keeps the same CA and the same certificates.
- File modes: directories 0700, private keys 0600 (written atomically, never world-readable
  even for an instant), certificates 0644.
- Errors never contain key material: ``TlsConfigError`` names the file and the problem in one
  line.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.errors import InvalidArgumentError, TlsConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CA_VALIDITY",
    "DEFAULT_TLS_HOSTS",
    "LEAF_VALIDITY",
    "RENEW_BEFORE",
    "LocalCA",
    "TlsFiles",
    "check_tls_files",
    "client_ssl_context",
    "create_local_ca",
]

CA_VALIDITY: Final = datetime.timedelta(days=3650)
"""How long a local CA certificate is valid."""
LEAF_VALIDITY: Final = datetime.timedelta(days=365)
"""How long a leaf certificate issued by a local CA is valid."""
RENEW_BEFORE: Final = datetime.timedelta(days=30)
"""A certificate with less than this left is replaced instead of reused."""
DEFAULT_TLS_HOSTS: Final = ("127.0.0.1", "::1", "localhost")
"""The names a local CA (and its leaves) cover by default: this machine only."""

_CA_CERT: Final = "ca.pem"
_CA_KEY: Final = "ca-key.pem"
# Backdating absorbs small clock differences between this process and nats-server.
_BACKDATE: Final = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class TlsFiles:
    """A certificate and its private key (PEM files), plus the CA that signed it and that
    peers are verified against. Used for a server's client port, its routes, or a client."""

    ca_file: Path
    cert_file: Path
    key_file: Path


# -- small helpers ---------------------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _host_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    """SAN entries: IP addresses as ``IPAddress``, everything else as ``DNSName``."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        if not host:
            raise InvalidArgumentError("a TLS host name must not be empty")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _key_usage(*, sign_certs: bool) -> x509.KeyUsage:
    """Signatures only (ECDSA keys agree on keys through ECDHE, not key encipherment);
    a CA also signs certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=sign_certs,
        crl_sign=sign_certs, encipher_only=False, decipher_only=False,
    )


def _constraint(name: x509.GeneralName) -> x509.GeneralName:
    """The name-constraint subtree that permits exactly ``name``."""
    if isinstance(name, x509.IPAddress):
        return x509.IPAddress(ipaddress.ip_network(name.value))
    return name


_NO_DNS: Final = "invalid"
"""The permitted DNS name of a CA made for IP addresses only (RFC 6761: never resolves), so
that its key cannot sign for any host name either."""


def _name_constraints(names: list[x509.GeneralName]) -> x509.NameConstraints:
    """Constraints permitting exactly ``names``. A kind absent from ``names`` is shut too:
    without an IP entry every IP address is excluded, without a DNS entry only ``invalid``
    is permitted (an unlisted kind would otherwise be unconstrained)."""
    permitted = [_constraint(n) for n in names]
    excluded: list[x509.GeneralName] = []
    if not any(isinstance(n, x509.IPAddress) for n in names):
        excluded = [x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
                    x509.IPAddress(ipaddress.ip_network("::/0"))]
    if not any(isinstance(n, x509.DNSName) for n in names):
        permitted.append(x509.DNSName(_NO_DNS))
    return x509.NameConstraints(permitted_subtrees=permitted,
                                excluded_subtrees=excluded or None)


def _mkdir_private(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)  # mkdir's mode is masked by umask, and the dir may exist


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (its ``.lock`` file) across processes, where
    the platform has ``fcntl``."""
    if fcntl is None:  # pragma: no cover - Windows: no parallel starts to guard there
        yield
        return
    fd = os.open(directory / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` whole or not at all, created with ``mode`` from the first byte."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomic(path, pem, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _write_atomic(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _load_pair(
    cert_file: Path, key_file: Path
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The certificate and key in these files if both load and match, else None (absent,
    unreadable or unusable files are simply replaced by the caller)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    if cert.public_key() != key.public_key():
        return None
    return cert, key


def _fresh(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return cert.not_valid_before_utc <= now and cert.not_valid_after_utc - now > RENEW_BEFORE


def _san(cert: x509.Certificate) -> list[x509.GeneralName]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value)


def _usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    except x509.ExtensionNotFound:
        return set()
    return set(ext.value)


def _permits(ca: x509.Certificate, name: x509.GeneralName) -> bool:
    """Whether the CA's name constraints allow ``name`` (exact names and IP networks only,
    the kinds this module writes)."""
    try:
        ext = ca.extensions.get_extension_for_class(x509.NameConstraints)
    except x509.ExtensionNotFound:
        return True
    permitted = ext.value.permitted_subtrees
    if permitted is None:
        return True
    for subtree in permitted:
        if isinstance(name, x509.IPAddress) and isinstance(subtree, x509.IPAddress):
            network = subtree.value
            address = name.value
            if (
                isinstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network)
                and isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address)
                and address.version == network.version
                and address in network
            ):
                return True
        elif (
            isinstance(name, x509.DNSName)
            and isinstance(subtree, x509.DNSName)
            and name.value.lower() == subtree.value.lower()
        ):
            return True
    return False


# -- the local CA ------------------------------------------------------------------------------


class LocalCA:
    """A certificate authority whose key and certificate live in ``directory``
    (``ca-key.pem``, 0600, and ``ca.pem``, 0644). Made by ``create_local_ca``."""

    def __init__(
        self, directory: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
    ) -> None:
        self._directory = directory
        self._cert = cert
        self._key = key

    @property
    def directory(self) -> Path:
        """Where the CA's files are."""
        return self._directory

    @property
    def cert_file(self) -> Path:
        """The CA certificate (PEM): what clients and servers trust."""
        return self._directory / _CA_CERT

    @property
    def key_file(self) -> Path:
        """The CA private key (PEM, mode 0600). Only ``issue`` needs it."""
        return self._directory / _CA_KEY

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the CA certificate (DER), lowercase hex: tells CAs apart."""
        return self._cert.fingerprint(hashes.SHA256()).hex()

    @property
    def hosts(self) -> tuple[str, ...]:
        """The names this CA may sign for (its name constraints), e.g. ``127.0.0.1``."""
        try:
            ext = self._cert.extensions.get_extension_for_class(x509.NameConstraints)
        except x509.ExtensionNotFound:
            return ()
        out: list[str] = []
        for subtree in ext.value.permitted_subtrees or ():
            if isinstance(subtree, x509.IPAddress):
                out.append(str(ipaddress.ip_network(subtree.value).network_address))
            elif isinstance(subtree, x509.DNSName) and subtree.value != _NO_DNS:
                out.append(subtree.value)
        return tuple(out)

    @property
    def not_valid_after(self) -> datetime.datetime:
        """When the CA certificate expires (UTC)."""
        return self._cert.not_valid_after_utc

    def issue(
        self,
        name: str,
        directory: Path | None = None,
        *,
        hosts: Sequence[str] | None = None,
        server: bool = True,
        client: bool = True,
    ) -> TlsFiles:
        """A leaf certificate for ``name``, in ``directory`` (default: the CA's directory) as
        ``<name>.pem`` (0644) and ``<name>-key.pem`` (0600), with ``hosts`` (default: every
        host the CA covers) as subject alternative names. ``server`` and ``client`` select the
        extended key usages (serverAuth, clientAuth); a route certificate needs both, since a
        server dials and accepts routes with the same certificate. Reuses valid existing
        files. Raises ``InvalidArgumentError`` for an empty or path-like name, no usage, or a
        host the CA may not sign for; ``TlsConfigError`` if ``directory`` cannot be written."""
        if not name or name.startswith(".") or "/" in name or "\\" in name or "\0" in name:
            raise InvalidArgumentError(f"invalid certificate name {name!r}: need a file name")
        if not (server or client):
            raise InvalidArgumentError("a certificate needs server or client usage (or both)")
        wanted = _host_names(hosts if hosts is not None else self.hosts or DEFAULT_TLS_HOSTS)
        if not wanted:
            raise InvalidArgumentError("a certificate needs at least one host")
        for host in wanted:
            if not _permits(self._cert, host):
                raise InvalidArgumentError(
                    f"this CA may not sign for {host.value}; it covers {', '.join(self.hosts)}"
                )
        usages = {
            *([ExtendedKeyUsageOID.SERVER_AUTH] if server else []),
            *([ExtendedKeyUsageOID.CLIENT_AUTH] if client else []),
        }
        where = directory if directory is not None else self._directory
        files = TlsFiles(self.cert_file, where / f"{name}.pem", where / f"{name}-key.pem")
        try:
            _mkdir_private(where)
            # Another process issuing the same name at once must not pair its key with our
            # certificate.
            with _locked(where):
                existing = _load_pair(files.cert_file, files.key_file)
                if existing is not None and self._reusable(existing[0], wanted, usages):
                    return files
                key = ec.generate_private_key(ec.SECP256R1())
                now = _now()
                cert = (
                    x509.CertificateBuilder()
                    .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                    .issuer_name(self._cert.subject)
                    .public_key(key.public_key())
                    .serial_number(x509.random_serial_number())
                    .not_valid_before(now - _BACKDATE)
                    .not_valid_after(min(now + LEAF_VALIDITY, self._cert.not_valid_after_utc))
                    .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                    .add_extension(
                        _key_usage(sign_certs=False),
                        critical=True,
                    )
                    .add_extension(x509.ExtendedKeyUsage(sorted(usages, key=str)), critical=False)
                    .add_extension(x509.SubjectAlternativeName(wanted), critical=False)
                    .add_extension(
                        x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
                    )
                    .add_extension(
                        x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                        critical=False,
                    )
                    .sign(self._key, hashes.SHA256())
                )
                # Key first: a certificate on disk always has its key beside it.
                _write_key(files.key_file, key)
                _write_cert(files.cert_file, cert)
                return files
        except OSError as exc:
            raise TlsConfigError(
                f"cannot write certificate {name!r} in {where}: {exc.strerror or exc}"
            ) from exc

    def _reusable(
        self,
        cert: x509.Certificate,
        wanted: list[x509.GeneralName],
        usages: set[x509.ObjectIdentifier],
    ) -> bool:
        if cert.issuer != self._cert.subject or not _fresh(cert, _now()):
            return False
        try:
            cert.verify_directly_issued_by(self._cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return set(_san(cert)) >= set(wanted) and _usages(cert) >= usages

    def __repr__(self) -> str:
        return f"<LocalCA {str(self._directory)!r} sha256={self.fingerprint[:16]}...>"


def create_local_ca(
    directory: Path | str,
    *,
    hosts: Sequence[str] = DEFAULT_TLS_HOSTS,
    name: str = "worknode local CA",
) -> LocalCA:
    """The local CA kept in ``directory`` (created 0700): the existing one when its files
    are valid and not about to expire, else a new EC P-256 key and a self-signed certificate
    valid ``CA_VALIDITY``, named ``name`` and constrained to sign only for ``hosts``.

    Calling it again returns the same CA (same ``fingerprint``): restarts keep their trust.
    ``hosts`` and ``name`` apply when a CA is created; a valid existing CA is kept as it is
    (``LocalCA.hosts`` tells what it covers). Safe to call from parallel processes. Raises
    ``InvalidArgumentError`` for no hosts, ``TlsConfigError`` if the directory cannot be
    written."""
    if not hosts:
        raise InvalidArgumentError("a local CA needs at least one host")
    names = _host_names(hosts)
    directory = Path(directory)
    try:
        _mkdir_private(directory)
        with _locked(directory):  # parallel starts must agree on one CA
            existing = _load_pair(directory / _CA_CERT, directory / _CA_KEY)
            if existing is not None and _is_ca(existing[0]) and _fresh(existing[0], _now()):
                return LocalCA(directory, *existing)
            key = ec.generate_private_key(ec.SECP256R1())
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
            now = _now()
            cert = (
                x509.CertificateBuilder()
                .subject_name(subject)
                .issuer_name(subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - _BACKDATE)
                .not_valid_after(now + CA_VALIDITY)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(
                    _key_usage(sign_certs=True),
                    critical=True,
                )
                .add_extension(_name_constraints(names), critical=True)
                .add_extension(
                    x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
                )
                .sign(key, hashes.SHA256())
            )
            _write_key(directory / _CA_KEY, key)
            _write_cert(directory / _CA_CERT, cert)
    except OSError as exc:
        raise TlsConfigError(
            f"cannot write the local CA in {directory}: {exc.strerror or exc}"
        ) from exc
    return LocalCA(directory, cert, key)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


# -- the client side ---------------------------------------------------------------------------


def _check_readable(path: Path, what: str) -> None:
    try:
        with path.open("rb") as f:
            f.read(1)
    except FileNotFoundError:
        raise TlsConfigError(f"TLS {what} {path}: no such file") from None
    except IsADirectoryError:
        raise TlsConfigError(f"TLS {what} {path}: is a directory, not a file") from None
    except OSError as exc:
        raise TlsConfigError(f"TLS {what} {path}: cannot read ({exc.strerror or exc})") from None


def _ssl_reason(exc: ssl.SSLError) -> str:
    """`` (reason)`` from OpenSSL's short token (e.g. KEY_VALUES_MISMATCH), never the
    file's contents; empty when OpenSSL gives none."""
    return f" ({exc.reason.lower().replace('_', ' ')})" if exc.reason else ""


def _load(
    context: ssl.SSLContext,
    ca_file: Path | str | None,
    cert_file: Path | str | None,
    key_file: Path | str | None,
) -> None:
    """Load the CA and the certificate/key pair into ``context``; ``TlsConfigError`` (one
    line naming the file) for anything missing, unreadable or invalid."""
    if key_file is not None and cert_file is None:
        raise TlsConfigError(f"TLS key file {key_file} given without a certificate file")
    if ca_file is not None:
        ca = Path(ca_file)
        _check_readable(ca, "CA file")
        try:
            context.load_verify_locations(cafile=str(ca))
        except ssl.SSLError as exc:
            raise TlsConfigError(
                f"TLS CA file {ca}: not a PEM certificate{_ssl_reason(exc)}"
            ) from None
    if cert_file is not None:
        cert = Path(cert_file)
        key = Path(key_file) if key_file is not None else None
        _check_readable(cert, "certificate file")
        if key is not None:
            _check_readable(key, "key file")
        try:
            x509.load_pem_x509_certificate(cert.read_bytes())
        except ValueError:
            raise TlsConfigError(f"TLS certificate file {cert}: not a PEM certificate") from None
        try:
            # An encrypted key gets an empty password (and fails) instead of a tty prompt.
            context.load_cert_chain(
                str(cert), str(key) if key is not None else None, password=lambda: b""
            )
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":  # OpenSSL's stable reason token
                problem = f"does not match the certificate {cert}"
            else:
                problem = f"not a usable unencrypted PEM private key{_ssl_reason(exc)}"
            raise TlsConfigError(f"TLS key file {key or cert}: {problem}") from None


def client_ssl_context(
    ca_file: Path | str | None,
    cert_file: Path | str | None = None,
    key_file: Path | str | None = None,
) -> ssl.SSLContext:
    """A client ``ssl.SSLContext`` for NATS: verifies the server's certificate and host name
    against ``ca_file`` (the system trust store when None), TLS 1.2 or newer, and presents
    ``cert_file``/``key_file`` as the client certificate when given (mutual TLS; the key may
    be inside ``cert_file``).

    Raises ``TlsConfigError`` (one line naming the file and the problem, never its contents)
    for a missing, unreadable or invalid file, or a key that does not match the
    certificate."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(context, ca_file, cert_file, key_file)
    return context


def check_tls_files(files: TlsFiles) -> None:
    """Check that ``files`` are usable before a server is given them: every file readable,
    the CA and the certificate PEM certificates, the key unencrypted and matching the
    certificate. Raises ``TlsConfigError`` (one line naming the file, never its contents).
    Chain and expiry are left to the peers that verify them."""
    _load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), files.ca_file, files.cert_file, files.key_file)
