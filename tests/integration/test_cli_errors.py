"""Every bad input to every ``worknode`` command ends with one line ``error: ...`` on stderr
and a non-zero exit status, never a traceback (issue 20): one real CLI process per case.

Each case names the command line, the environment and a piece of the expected message, so a
case also fails when the line is there but does not say what is wrong. Placeholders in
arguments and environment values: ``{tmp}`` (a directory of prepared bad files) and
``{busy_port}`` (a loopback port another socket holds).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SECRET = "hunter2"
"""A password in URLs: it must never appear in the output."""


@dataclass(frozen=True)
class Case:
    """One bad input: ``args`` to ``worknode``, extra ``env``, a piece of the message."""

    id: str
    args: tuple[str, ...]
    expect: str
    env: dict[str, str] = field(default_factory=dict)


URL = "nats://127.0.0.1:4222"
CLOSED = '["nats://127.0.0.1:1"]'
"""A valid URL nothing listens on: these cases must fail before connecting."""
NET = ("--nats-url", URL)
CLOSED_NET = ("--nats-url", "nats://127.0.0.1:1")
TOK = ("--token", "AAAA")
HOLDER = ("--holder", "ab" * 32)
HEALER_OK = {"WORKNODE_HEALER_NATS_URLS": f'["{URL}"]',
             "WORKNODE_HEALER_CLUSTER_SECRET_FILE": "{tmp}/secret"}

CASES = [
    # -- worknode node: config file, environment, resources
    Case("node-config-missing", ("node", "--config", "/nonexistent.toml"), "does not exist"),
    Case("node-config-dir", ("node", "--config", "{tmp}"), "is a directory"),
    Case("node-config-syntax", ("node", "--config", "{tmp}/bad.toml"), "invalid TOML"),
    Case("node-config-unknown-key", ("node", "--config", "{tmp}/unknown.toml"),
         "unknown setting 'colour'"),
    Case("node-config-env-missing", ("node",), "/nonexistent/worknode.toml",
         {"WORKNODE_CONFIG_FILE": "/nonexistent/worknode.toml"}),
    Case("node-id-missing", ("node",), "WORKNODE_NODE_ID"),
    Case("node-id-invalid", ("node", "--node-id", "bad id!"), "node_id"),
    Case("node-metrics-port-abc", ("node", "--node-id", "n1"), "WORKNODE_METRICS_PORT",
         {"WORKNODE_METRICS_PORT": "abc"}),
    Case("node-subjects-not-json", ("node", "--node-id", "n1"),
         "WORKNODE_SUBJECTS: not valid JSON",
         {"WORKNODE_SUBJECTS": "orders,users"}),
    Case("node-subject-invalid", ("node", "--node-id", "n1"), "subjects",
         {"WORKNODE_SUBJECTS": '["a.b"]'}),
    Case("node-wire-version", ("node", "--node-id", "n1"), "wire versions",
         {"WORKNODE_WIRE_VERSION": "9"}),
    Case("node-flush-interval", ("node", "--node-id", "n1"), "flush_interval_ms",
         {"WORKNODE_FLUSH_INTERVAL_MS": "0"}),
    Case("node-store-sync", ("node", "--node-id", "n1"), "store_sync",
         {"WORKNODE_STORE_SYNC": "sometimes"}),
    Case("node-url-no-colon", ("node", "--node-id", "n1"), "invalid NATS URL",
         {"WORKNODE_NATS_URLS": '["nats//127.0.0.1:4222"]'}),
    Case("node-url-port", ("node", "--node-id", "n1"), "invalid NATS URL",
         {"WORKNODE_NATS_URLS": f'["nats://u:{SECRET}@127.0.0.1:42x2"]'}),
    Case("node-urls-not-json", ("node", "--node-id", "n1"),
         "WORKNODE_NATS_URLS: not valid JSON",
         {"WORKNODE_NATS_URLS": f"nats://u:{SECRET}@127.0.0.1:4222"}),
    Case("node-url-scheme", ("node", "--node-id", "n1"), "scheme 'http'",
         {"WORKNODE_NATS_URLS": '["http://127.0.0.1:4222"]'}),
    Case("node-roster-missing", ("node", "--node-id", "n1"), "cannot read roster",
         {"WORKNODE_ROSTER_FILE": "/nonexistent/roster.json", "WORKNODE_STATE_DIR": "{tmp}/s1"}),
    Case("node-roster-bad-json", ("node", "--node-id", "n1"), "cannot read roster",
         {"WORKNODE_ROSTER_FILE": "{tmp}/bad.json", "WORKNODE_STATE_DIR": "{tmp}/s2"}),
    Case("node-key-short", ("node", "--node-id", "n1"), "32-byte",
         {"WORKNODE_KEY_FILE": "{tmp}/short.key", "WORKNODE_STATE_DIR": "{tmp}/s3"}),
    Case("node-state-dir-is-file", ("node", "--node-id", "n1"), "{tmp}/short.key",
         {"WORKNODE_STATE_DIR": "{tmp}/short.key"}),
    Case("node-cluster-secret-missing", ("node", "--node-id", "n1"), "cluster secret",
         {"WORKNODE_CLUSTER_SECRET_FILE": "/nonexistent/secret",
          "WORKNODE_STATE_DIR": "{tmp}/s4"}),
    Case("node-metrics-port-in-use", ("node", "--node-id", "n1"), "cannot serve metrics",
         {"WORKNODE_METRICS_PORT": "{busy_port}", "WORKNODE_STATE_DIR": "{tmp}/s5"}),
    Case("node-metrics-port-range", ("node", "--node-id", "n1"), "less than or equal to 65535",
         {"WORKNODE_METRICS_PORT": "70000"}),
    Case("node-tls-ca-missing", ("node", "--node-id", "n1"), "TLS CA file /nonexistent/ca.pem",
         {"WORKNODE_NATS_TLS_CA_FILE": "/nonexistent/ca.pem", "WORKNODE_NATS_URLS": CLOSED,
          "WORKNODE_STATE_DIR": "{tmp}/s7"}),
    Case("node-tls-cert-bad", ("node", "--node-id", "n1"), "TLS certificate file {tmp}/bad.json",
         {"WORKNODE_NATS_TLS_CERT_FILE": "{tmp}/bad.json", "WORKNODE_NATS_URLS": CLOSED,
          "WORKNODE_STATE_DIR": "{tmp}/s8"}),
    Case("node-creds-missing", ("node", "--node-id", "n1"), "creds file /nonexistent/user.creds",
         {"WORKNODE_NATS_CREDS_FILE": "/nonexistent/user.creds", "WORKNODE_NATS_URLS": CLOSED,
          "WORKNODE_STATE_DIR": "{tmp}/s9"}),
    Case("node-rpc-keyring-bad", ("node", "--node-id", "n1"), "keyring",
         {"WORKNODE_RPC_KEYRING_FILE": "{tmp}/bad.json", "WORKNODE_STATE_DIR": "{tmp}/s6"}),
    # -- worknode healer
    Case("healer-no-settings", ("healer", "--once"), "WORKNODE_HEALER_NATS_URLS"),
    Case("healer-config-missing", ("healer", "--config", "/nonexistent.toml"), "does not exist"),
    Case("healer-config-syntax", ("healer", "--config", "{tmp}/bad.toml"), "invalid TOML"),
    Case("healer-config-unknown-key", ("healer", "--config", "{tmp}/unknown.toml"),
         "unknown setting 'colour'", HEALER_OK),
    Case("healer-url-typo", ("healer", "--once"), "invalid NATS URL",
         {**HEALER_OK, "WORKNODE_HEALER_NATS_URLS": f'["nats://u:{SECRET}@127.0.0.1:4222/x"]'}),
    Case("healer-interval", ("healer", "--once"), "interval_s",
         {**HEALER_OK, "WORKNODE_HEALER_INTERVAL_S": "-1"}),
    Case("healer-secret-missing", ("healer", "--once"), "cluster secret",
         {**HEALER_OK, "WORKNODE_HEALER_CLUSTER_SECRET_FILE": "/nonexistent/secret",
          "WORKNODE_HEALER_STATE_DIR": "{tmp}/h1"}),
    Case("healer-metrics-port-range", ("healer", "--once"), "WORKNODE_HEALER_METRICS_PORT",
         {**HEALER_OK, "WORKNODE_HEALER_METRICS_PORT": "-1"}),
    Case("healer-metrics-port-abc", ("healer", "--once"), "WORKNODE_HEALER_METRICS_PORT",
         {**HEALER_OK, "WORKNODE_HEALER_METRICS_PORT": "abc"}),
    # -- worknode up and demo: numeric options
    Case("up-writes-negative", ("up", "--writes", "-5"), "--writes"),
    Case("up-writes-text", ("up", "--writes", "many"), "--writes"),
    Case("up-state-dir-is-file", ("up", "--state-dir", "{tmp}/short.key"), "{tmp}/short.key"),
    Case("demo-loss", ("demo", "--loss", "2"), "--loss"),
    Case("demo-writes-zero", ("demo", "--writes", "0"), "--writes"),
    Case("demo-seed-text", ("demo", "--seed", "x"), "--seed"),
    # -- tail
    Case("tail-no-url", ("tail", "demo"), "--nats-url"),
    Case("tail-url-typo", ("tail", "demo", "--nats-url", "nats://127.0.0.1:4222,x"),
         "invalid NATS URL"),
    Case("tail-subject", ("tail", "a.b", *NET), "subject"),
    Case("tail-count", ("tail", "demo", *NET, "--count", "-1"), "--count"),
    Case("tail-roster-missing", ("tail", "demo", *NET, "--roster", "/nonexistent.json"),
         "does not exist"),
    # -- write commands
    Case("set-no-url", ("set", "demo", "n1", "f", "1"), "--nats-url"),
    Case("set-url-typo", ("set", "demo", "n1", "f", "1", "--nats-url",
                          f"nats://cli:{SECRET}@127.0.0.1:4222?x"), "invalid NATS URL"),
    Case("set-subject", ("set", "a.b", "n1", "f", "1", *NET), "subject"),
    Case("set-node-id", ("set", "demo", "n1", "f", "1", *NET, "--node-id", "bad id"),
         "node_id"),
    Case("set-node-name", ("set", "demo", "bad node", "f", "1", *CLOSED_NET), "worknode id"),
    Case("set-empty-field", ("set", "demo", "n1", "a..b", "1", *CLOSED_NET), "map keys"),
    Case("create-parent", ("create", "demo", "n1", "bad parent!", *CLOSED_NET), "worknode id"),
    Case("incr-amount", ("incr", "demo", "n1", "f", "lots", *NET), "AMOUNT"),
    Case("create-roster-bad", ("create", "demo", "n1", *NET, "--roster", "{tmp}/bad.json",
                               "--state-dir", "{tmp}/c1"), "cannot read roster"),
    Case("move-missing-parent", ("move", "demo", "n1", *NET), "PARENT"),
    # -- token and call
    Case("keygen-out-exists", ("token", "keygen", "--key-id", "2", "--out", "{tmp}/short.key",
                               "--keyring", "{tmp}/new-keyring.json"), "refusing to overwrite"),
    Case("keygen-key-id", ("token", "keygen", "--key-id", "-1", "--out", "{tmp}/k.key",
                           "--keyring", "{tmp}/k.json"), "--key-id"),
    Case("keygen-keyring-bad", ("token", "keygen", "--key-id", "1", "--out", "{tmp}/k2.key",
                                "--keyring", "{tmp}/bad.json"), "cannot read keyring"),
    Case("mint-root-key-missing", ("token", "mint", "--root-key", "/nonexistent.key",
                                   "--namespace", "ns", "--subject", "s", *HOLDER),
         "does not exist"),
    Case("mint-root-key-bad", ("token", "mint", "--root-key", "{tmp}/bad.json",
                               "--namespace", "ns", "--subject", "s", *HOLDER),
         "cannot read root key"),
    Case("mint-ttl", ("token", "mint", "--root-key", "{tmp}/bad.json", "--namespace", "ns",
                      "--subject", "s", "--ttl", "0", *HOLDER), "--ttl"),
    Case("mint-no-holder", ("token", "mint", "--root-key", "{tmp}/bad.json", "--namespace", "ns",
                            "--subject", "s"), "--holder"),
    Case("mint-holder-hex", ("token", "mint", "--root-key", "{tmp}/bad.json", "--namespace",
                             "ns", "--subject", "s", "--holder", "zz"), "--holder"),
    Case("mint-holder-seed-bad", ("token", "mint", "--root-key", "{tmp}/bad.json",
                                  "--namespace", "ns", "--subject", "s", "--holder",
                                  "@{tmp}/short.key"), "cannot read signing key"),
    Case("attenuate-not-base64", ("token", "attenuate", "!!!", "--keyring", "{tmp}/bad.json",
                                  "--method", "get"),
         "cannot read keyring"),
    Case("inspect-garbage", ("token", "inspect", "AAAA"), "token"),
    Case("inspect-file-missing", ("token", "inspect", "@/nonexistent/token"),
         "/nonexistent/token"),
    Case("revoke-url-typo", ("token", "revoke", "ab" * 16, "--nats-url", "nats:/127.0.0.1", *TOK),
         "invalid NATS URL"),
    Case("call-arg", ("call", "s", "n", "get", "novalue", *NET, *TOK), "NAME=VALUE"),
    Case("call-timeout", ("call", "s", "n", "get", *NET, *TOK, "--timeout-ms", "0"),
         "--timeout-ms"),
    Case("call-url-typo", ("call", "s", "n", "get", "--nats-url",
                           f"tls://{SECRET}@127.0.0.1:99999", *TOK), "invalid NATS URL"),
    Case("call-subject", ("call", "bad subj", "n", "get", *CLOSED_NET, *TOK), "subject"),
    Case("call-worknode", ("call", "s", "bad node!", "get", *CLOSED_NET, *TOK), "worknode id"),
    Case("mint-ttl-huge", ("token", "mint", "--root-key", "{tmp}/bad.json", "--namespace", "ns",
                           "--subject", "s", "--ttl", "1e400", *HOLDER), "--ttl"),
    Case("attenuate-nothing", ("token", "attenuate", "AAAA", "--keyring", "{tmp}/bad.json"),
         "nothing to narrow"),
    Case("call-no-token", ("call", "s", "n", "get", *NET), "--token"),
    Case("call-no-key", ("call", "s", "n", "get", *NET, *TOK), "--key"),
    Case("call-key-bad", ("call", "s", "n", "get", *NET, *TOK, "--key", "{tmp}/short.key"),
         "cannot read signing key"),
    Case("call-roster-bad", ("call", "s", "n", "get", *NET, *TOK, "--key", "{tmp}/secret",
                             "--roster", "{tmp}/bad.json"), "cannot read roster"),
    # -- keys
    Case("keys-show-missing", ("keys", "show", "/nonexistent.key"), "does not exist"),
    Case("keys-show-not-a-seed", ("keys", "show", "{tmp}/short.key"), "32-byte"),
    Case("keys-roster-entry", ("keys", "roster", "{tmp}/r.json", "n1"), "ID=PUBLIC_KEY_HEX"),
    Case("keys-roster-hex", ("keys", "roster", "{tmp}/r.json", "n1=zz"), "not hex"),
    Case("keys-roster-short-key", ("keys", "roster", "{tmp}/r.json", "n1=abcd"), "32 bytes"),
    Case("keys-roster-id", ("keys", "roster", "{tmp}/r.json", "bad id=" + "ab" * 32),
         "invalid replica id"),
    Case("keys-roster-no-dir", ("keys", "roster", "/nonexistent/dir/r.json", "n1=" + "ab" * 32),
         "/nonexistent/dir"),
    Case("keys-roster-nothing", ("keys", "roster", "{tmp}/none.json"), "nothing to add"),
    Case("keys-roster-bad-file", ("keys", "roster", "{tmp}/bad.json", "n1=" + "ab" * 32),
         "cannot read roster"),
    Case("keys-roster-seed-missing", ("keys", "roster", "{tmp}/r.json", "n1=@/nonexistent"),
         "cannot read seed"),
    # -- roster revoke
    Case("roster-revoke-unknown-id", ("roster", "revoke", "n9", "--roster", "{tmp}/one.json"),
         "does not trust 'n9': nothing revoked (it trusts n1)"),
    Case("roster-revoke-no-file", ("roster", "revoke", "n1", "--roster", "/nonexistent.json"),
         "no roster at /nonexistent.json"),
    Case("roster-revoke-bad-file", ("roster", "revoke", "n1", "--roster", "{tmp}/bad.json"),
         "cannot read roster"),
    Case("roster-revoke-revoked-kept", ("roster", "revoke", "n1", "--roster",
                                        "{tmp}/readds.json"), "was revoked"),
    Case("roster-revoke-no-id", ("roster", "revoke", "--roster", "{tmp}/one.json"), "ID..."),
    # -- schema check
    Case("schema-dir-missing", ("schema", "check", "--schemas", "/nonexistent"), "/nonexistent"),
    Case("schema-releases-missing", ("schema", "check", "--releases", "/nonexistent"),
         "--releases"),
    Case("schema-releases-empty", ("schema", "check", "--releases", "{tmp}/empty"),
         "no release"),
    Case("schema-bad-capnp", ("schema", "check", "--schemas", "{tmp}/schemas"), "error"),
    # -- the group itself
    Case("unknown-command", ("frobnicate",), "frobnicate"),
    Case("unknown-option", ("--frobnicate",), "--frobnicate"),
]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of prepared bad inputs."""
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "bad.toml").write_text('node_id = "n1"\nsubjects = [\n')
    (tmp / "unknown.toml").write_text('node_id = "n1"\ncolour = "blue"\n')
    (tmp / "bad.json").write_text("{not json")
    (tmp / "one.json").write_text(json.dumps({"n1": "ab" * 32}))
    (tmp / "readds.json").write_text(json.dumps(  # trusts a key it lists as revoked
        {"$revoked": [{"id": "n0", "key": "ab" * 32}], "n1": "ab" * 32}))
    (tmp / "short.key").write_bytes(b"too short")
    (tmp / "secret").write_bytes(os.urandom(32))
    (tmp / "empty").mkdir()
    (tmp / "schemas").mkdir()
    (tmp / "schemas" / "broken.capnp").write_text("struct {\n")
    return tmp


@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    """A loopback port held by a listening socket for the whole module."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _fill(text: str, tmp: Path, port: int) -> str:
    return text.replace("{tmp}", str(tmp)).replace("{busy_port}", str(port))


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``worknode ARGS`` as a real process (stopped if it outlives the timeout)."""
    # WARNING: the services' INFO lines (connected, ...) are not what is tested here.
    base = {k: v for k, v in os.environ.items() if not k.startswith("WORKNODE_")}
    base["WORKNODE_LOG_LEVEL"] = "WARNING"
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args], env={**base, **env}, cwd=cwd,
        capture_output=True, text=True, timeout=60, check=False,
    )


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_ends_with_one_error_line(
    case: Case, bad_files: Path, busy_port: int, tmp_path: Path
) -> None:
    args = [_fill(a, bad_files, busy_port) for a in case.args]
    env = {k: _fill(v, bad_files, busy_port) for k, v in case.env.items()}
    result = run_cli(args, env, cwd=tmp_path)
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    assert _fill(case.expect, bad_files, busy_port) in lines[0]
    assert "(a bug;" not in lines[0]  # the boundary's last resort: a bad input is known
    assert SECRET not in result.stderr + result.stdout


def test_every_case_is_distinct() -> None:
    assert len({c.id for c in CASES}) == len(CASES)
    assert len({(c.args, tuple(sorted(c.env.items()))) for c in CASES}) == len(CASES)


def test_help_version_and_a_bare_group_are_not_errors(tmp_path: Path) -> None:
    """The boundary turns failures into one line, not help or the version."""
    for args in (["--help"], ["--version"], ["keys", "--help"]):
        result = run_cli(args, {}, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout
        assert "error:" not in result.stderr
    bare = run_cli(["keys"], {}, cwd=tmp_path)  # as click does: the group's help, status 2
    assert bare.returncode == 2
    assert "Usage:" in bare.stdout + bare.stderr
    assert "error:" not in bare.stderr
