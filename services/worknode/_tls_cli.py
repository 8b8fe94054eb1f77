"""``worknode tls``: a local certificate authority and the certificates NATS servers (client
connections and routes) and clients present, for deployments without a corporate CA: the
compose stack's key setup uses it, and so can an operator (README "Security")."""

from __future__ import annotations

from pathlib import Path

import click

from broker.transport import DEFAULT_TLS_HOSTS, create_local_ca

__all__ = ["register_tls"]


def register_tls(main: click.Group) -> None:
    """Add ``tls init`` and ``tls issue`` to the ``worknode`` group."""

    @main.group()
    def tls() -> None:
        """A local CA and the certificates it signs (EC P-256, PEM files)."""

    @tls.command("init")
    @click.argument("ca_dir", type=click.Path(file_okay=False, path_type=Path))
    @click.option("--host", "hosts", multiple=True,
                  help="A host name or IP address the CA may sign for (repeatable; the CA is "
                  f"constrained to these). Default: {', '.join(DEFAULT_TLS_HOSTS)}.")
    def init(ca_dir: Path, hosts: tuple[str, ...]) -> None:
        """Create the CA in CA_DIR (ca.pem, ca-key.pem 0600), or keep the valid one there;
        print its certificate, fingerprint and the hosts it covers."""
        ca = create_local_ca(ca_dir, hosts=hosts or DEFAULT_TLS_HOSTS)
        click.echo(f"CA {ca.cert_file} sha256:{ca.fingerprint} signs for {', '.join(ca.hosts)}")

    @tls.command("issue")
    @click.argument("ca_dir", type=click.Path(file_okay=False, path_type=Path))
    @click.argument("name")
    @click.option("--host", "hosts", multiple=True,
                  help="Subject alternative name (repeatable). Default: every CA host.")
    @click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
                  default=None, help="Directory for NAME.pem and NAME-key.pem (default CA_DIR).")
    @click.option("--server/--no-server", default=True, show_default=True,
                  help="Usable by a server (client connections, both ends of a route).")
    @click.option("--client/--no-client", default=True, show_default=True,
                  help="Usable by a client (mutual TLS, both ends of a route).")
    def issue(ca_dir: Path, name: str, hosts: tuple[str, ...], out_dir: Path | None,
              server: bool, client: bool) -> None:
        """Issue (or keep, while valid) the certificate NAME signed by the CA in CA_DIR;
        print the CA, certificate and key files."""
        if not (ca_dir / "ca.pem").is_file():
            raise click.ClickException(f"no CA in {ca_dir}: run 'worknode tls init {ca_dir}'")
        ca = create_local_ca(ca_dir)
        files = ca.issue(name, out_dir, hosts=hosts or None, server=server, client=client)
        click.echo(f"ca {files.ca_file}\ncert {files.cert_file}\nkey {files.key_file}")
