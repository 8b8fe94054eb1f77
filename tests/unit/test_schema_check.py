"""``worknode schema check``: a catalogue of schema edits, each breaking edit caught by the
right rule and each safe edit passing; transitive checking; the command line's output and
exit codes; hostile schema files.

Every catalogue directory is dumped by a single worker subprocess (module fixture) and the
comparisons run in-process, so the whole file stays fast.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.codec import SUPPORTED_VERSIONS
from schemas import CURRENT_DIR, release_dir
from services.cli import main
from services.schemacheck import (
    CLOSED,
    RULES,
    STRUCT_EVOLUTION,
    Snapshot,
    check,
    check_directories,
    check_snapshots,
    closed_structs,
    dump_directories,
    load_snapshots,
    union_only_structs,
)

CRDT = """\
@0xc0ffee0000000001;
# CRDT values. Fixture for the schema checker tests.

using Env = import "/env.capnp";

enum Kind @0xc0ffee0000000010 {
  register @0;
  counter @1;
  set @2;
}

struct Value @0xc0ffee0000000011 {
  # A self-describing CRDT value.
  kind @0 :Kind = counter;
  union {
    none @1 :Void;
    int @2 :Int64;
    text @3 :Text;
    nested @4 :Map;
  }
  weight @5 :Float32 = 1.5;
  meta :group {
    author @6 :Text = "anon";
    tags @7 :List(Text);
    origin @8 :Env.Origin;
  }

  struct Map @0xc0ffee0000000012 {
    entries @0 :List(Entry);

    struct Entry @0xc0ffee0000000013 {
      key @0 :Text;
      value @1 :Value;
    }
  }
}

struct Pair @0xc0ffee0000000014 (K, V) {
  key @0 :K;
  value @1 :V;
}
"""

ENV = """\
@0xc0ffee0000000002;
# Envelopes and the store interface.

using Crdt = import "crdt.capnp";

struct Origin @0xc0ffee0000000020 {
  node @0 :Text;
  zone @1 :Text;
  seq @2 :UInt64 = 1;
  shard @3 :UInt32;
  lane @4 :UInt16;
}

struct Envelope @0xc0ffee0000000021 {
  version @0 :UInt16 = 1;
  origin @1 :Origin;
  values @2 :List(Crdt.Value);
  flags @3 :List(Bool) = [true, false];
  limits @4 :Origin = (node = "n", seq = 7);
  labels @5 :Crdt.Pair(Text, Crdt.Value);
}

struct Heartbeat @0xc0ffee0000000022 {
  at @0 :UInt64;
  note @1 :Text;
}

interface Store @0xc0ffee0000000023 {
  put @0 (envelope :Envelope, ttl :UInt32 = 60) -> (accepted :Bool);
  get @1 Origin -> Envelope;
}

interface Admin @0xc0ffee0000000024 extends(Store) {
  reset @0 () -> ();
}
"""

BASE: Mapping[str, str] = {"crdt.capnp": CRDT, "env.capnp": ENV}

# An edit is a list of operations on the base files:
#   (file, old, new)   replace the one occurrence of ``old`` (it must exist) by ``new``
#   (file, None, text) create ``file`` with ``text``
#   (file, None, None) delete ``file``
Op = tuple[str, str | None, str | None]


def _apply(files: Mapping[str, str], ops: list[Op]) -> dict[str, str]:
    out = dict(files)
    for file, old, new in ops:
        if old is None:
            if new is None:
                del out[file]
            else:
                out[file] = new
            continue
        assert new is not None
        assert out[file].count(old) == 1, f"{file}: {old!r} must occur exactly once"
        out[file] = out[file].replace(old, new)
    return out


def _sub_all(pattern: str, repl: str) -> list[Op]:
    """Replace a word in every base file (for renames that touch references)."""
    ops: list[Op] = []
    for file, text in BASE.items():
        new = re.sub(pattern, repl, text)
        if new != text:
            ops += [(file, None, None), (file, None, new)]
    return ops


@dataclass(frozen=True)
class Case:
    """A breaking edit: the rule it is about and every rule it triggers (exactly)."""

    rule: str
    expected: frozenset[str]
    ops: list[Op]
    id: str


@dataclass(frozen=True)
class Safe:
    """A safe edit: no violation at all."""

    id: str
    ops: list[Op]


def _case(rule: str, ops: list[Op], *also: str, name: str = "") -> Case:
    return Case(rule, frozenset({rule, *also}), ops, f"{rule}{name}")


_TAG = """\
  struct Tag @0xc0ffee0000000016 {
    name @0 :Text;
    score @1 :Float32;
  }

"""


def _origin_generic_ops(limits_binding: str | None) -> list[Op]:
    """Make Origin generic (``zone`` becomes its parameter T); every user binds T to Text,
    except ``Envelope.limits``, bound to ``limits_binding`` (None: left unbound)."""
    limits = "Origin" if limits_binding is None else f"Origin({limits_binding})"
    return [
        ("env.capnp", "struct Origin @0xc0ffee0000000020 {",
         "struct Origin @0xc0ffee0000000020 (T) {"),
        ("env.capnp", "zone @1 :Text;", "zone @1 :T;"),
        ("env.capnp", "origin @1 :Origin;", "origin @1 :Origin(Text);"),
        ("env.capnp", "limits @4 :Origin =", f"limits @4 :{limits} ="),
        ("crdt.capnp", "origin @8 :Env.Origin;", "origin @8 :Env.Origin(Text);"),
    ]


BREAKING = [
    _case("FILE_REMOVED", [
        ("env.capnp", None, None), ("envelope.capnp", None, ENV),
        ("crdt.capnp", '"/env.capnp"', '"/envelope.capnp"'),
    ]),
    _case("FILE_ID_CHANGED", [("env.capnp", "@0xc0ffee0000000002;", "@0xc0ffee00000000f2;")]),
    _case("ID_MISSING", [("env.capnp", "Heartbeat @0xc0ffee0000000022 {", "Heartbeat {")],
          "ID_CHANGED"),
    _case("ID_CHANGED", [("env.capnp", "@0xc0ffee0000000022", "@0xc0ffee00000000f3")]),
    _case("NODE_REMOVED", [("env.capnp", """\
struct Heartbeat @0xc0ffee0000000022 {
  at @0 :UInt64;
  note @1 :Text;
}
""", "")]),
    _case("KIND_CHANGED", [("env.capnp", """\
struct Heartbeat @0xc0ffee0000000022 {
  at @0 :UInt64;
  note @1 :Text;
}""", "enum Heartbeat @0xc0ffee0000000022 { at @0; note @1; }")]),
    _case("FIELD_REMOVED", [("env.capnp", "  lane @4 :UInt16;\n", "")]),
    # Swapped names: the limits default ("n" in pointer 0) now sits in the other field.
    _case("ORDINAL_CHANGED", [
        ("env.capnp", "node @0 :Text;\n  zone @1 :Text;", "node @1 :Text;\n  zone @0 :Text;"),
    ], "DEFAULT_CHANGED"),
    _case("TYPE_CHANGED", [("crdt.capnp", "int @2 :Int64;", "int @2 :UInt64;")],
          name="-width"),
    _case("TYPE_CHANGED", [("crdt.capnp", "tags @7 :List(Text);", "tags @7 :List(Data);")],
          name="-list-element"),
    _case("TYPE_CHANGED", [("env.capnp", "origin @1 :Origin;", "origin @1 :Heartbeat;")],
          name="-struct-id"),
    _case("TYPE_CHANGED", [("env.capnp", "Crdt.Pair(Text, Crdt.Value)",
                            "Crdt.Pair(Data, Crdt.Value)")], name="-generic-binding"),
    _case("DEFAULT_CHANGED", [("crdt.capnp", "= 1.5;", "= 2.5;")], name="-float"),
    _case("DEFAULT_CHANGED", [("crdt.capnp", "= counter;", "= set;")], name="-enum"),
    _case("DEFAULT_CHANGED", [("crdt.capnp", '= "anon";', '= "anonymous";')],
          name="-text-in-group"),
    _case("DEFAULT_CHANGED", [("env.capnp", "seq = 7)", "seq = 8)")], name="-struct"),
    _case("DEFAULT_CHANGED", [("env.capnp", "[true, false]", "[true, true]")], name="-list"),
    # Findings inside implicit "(a :T)" structs are reported under the method rule.
    _case("METHOD_PARAM_TYPE_CHANGED", [("env.capnp", "ttl :UInt32 = 60", "ttl :UInt32 = 61")],
          name="-default"),
    # Widening ``shard`` moves ``lane`` (the next ordinal) to a new offset.
    _case("OFFSET_CHANGED", [("env.capnp", "shard @3 :UInt32;", "shard @3 :UInt64;")],
          "TYPE_CHANGED"),
    _case("UNION_MEMBERSHIP_CHANGED", [
        ("crdt.capnp", "  weight @5 :Float32 = 1.5;\n", ""),
        ("crdt.capnp", "nested @4 :Map;", "nested @4 :Map;\n    weight @5 :Float32 = 1.5;"),
    ], "OFFSET_CHANGED", name="-into"),  # weight now shares the union's space
    _case("UNION_MEMBERSHIP_CHANGED", [
        ("crdt.capnp", "    text @3 :Text;\n", ""),
        ("crdt.capnp", "  weight @5", "  text @3 :Text;\n  weight @5"),
    ], "OFFSET_CHANGED", name="-out-of"),  # text needs its own pointer: later ones move
    _case("GROUP_CHANGED", [
        ("crdt.capnp", "  weight @5 :Float32 = 1.5;\n", ""),
        ("crdt.capnp", "  meta :group {\n", "  meta :group {\n    weight @5 :Float32 = 1.5;\n"),
    ]),
    _case("STRUCT_LAYOUT_SHRUNK", [("env.capnp", "note @1 :Text;", "note @1 :UInt8;")],
          "TYPE_CHANGED"),
    _case("ENUMERANT_REMOVED", [("crdt.capnp", "  set @2;\n", "")]),
    # Value.kind defaults to ``counter``: its number changes with it.
    _case("ENUMERANT_ORDINAL_CHANGED", [
        ("crdt.capnp", "register @0;\n  counter @1;", "register @1;\n  counter @0;"),
    ], "DEFAULT_CHANGED"),
    _case("METHOD_REMOVED", [("env.capnp", "  get @1 Origin -> Envelope;\n", "")]),
    _case("METHOD_ORDINAL_CHANGED", [
        ("env.capnp", "put @0", "put @1"), ("env.capnp", "get @1", "get @0"),
    ], "METHOD_PARAM_TYPE_CHANGED", "METHOD_RESULT_TYPE_CHANGED"),
    _case("METHOD_PARAM_TYPE_CHANGED", [("env.capnp", "ttl :UInt32", "ttl :UInt64")],
          name="-implicit"),
    _case("METHOD_PARAM_TYPE_CHANGED", [("env.capnp", "get @1 Origin", "get @1 Heartbeat")],
          name="-explicit"),
    _case("METHOD_RESULT_TYPE_CHANGED", [("env.capnp", "accepted :Bool", "accepted :Text")]),
    _case("SUPERCLASS_REMOVED", [("env.capnp", " extends(Store)", "")]),
    # A new parameter replacing a field's type, bound to Data by one user, Text by others.
    _case("TYPE_CHANGED", _origin_generic_ops("Data"), name="-new-generic-bound-differently"),
    _case("GENERIC_PARAMETERS_CHANGED", _origin_generic_ops(None), "TYPE_CHANGED",
          name="-added-and-left-unbound"),
    # List(Text) -> List(struct) whose @0 is Data, not Text.
    _case("TYPE_CHANGED", [
        ("crdt.capnp", "tags @7 :List(Text);", "tags @7 :List(Tag);"),
        ("crdt.capnp", "  struct Map @", _TAG.replace(":Text", ":Data") + "  struct Map @"),
    ], name="-list-upgrade-wrong-first-field"),
    _case("GROUP_CHANGED", [
        ("crdt.capnp", "  weight @5 :Float32 = 1.5;\n", ""),
        ("crdt.capnp", "    tags @7 :List(Text);\n",
         "    tags @7 :List(Text);\n    inner :group {\n      weight @5 :Float32 = 1.5;\n    }\n"),
    ], name="-into-new-group-inside-an-old-one-moved-from-root"),
    _case("GENERIC_PARAMETERS_CHANGED", [
        ("crdt.capnp", "(K, V) {", "(K) {"), ("crdt.capnp", "value @1 :V;", "value @1 :K;"),
        ("env.capnp", "Crdt.Pair(Text, Crdt.Value)", "Crdt.Pair(Text)"),
    ], "TYPE_CHANGED"),
]

SAFE = [
    # The three kinds Cap'n Proto allows that the checker used to refuse (issue 14).
    Safe("wrap-field-in-new-group", [
        ("crdt.capnp", "  weight @5 :Float32 = 1.5;\n",
         "  scoring :group {\n    weight @5 :Float32 = 1.5;\n    bias @9 :Int8;\n  }\n"),
    ]),
    Safe("wrap-group-field-in-new-nested-group", [
        ("crdt.capnp", "    author @6 :Text = \"anon\";\n",
         "    by :group {\n      author @6 :Text = \"anon\";\n    }\n"),
    ]),
    Safe("add-generic-parameter-every-user-binds", [
        ("crdt.capnp", "(K, V) {", "(K, V, W) {"),
        ("crdt.capnp", "value @1 :V;", "value @1 :V;\n  extra @2 :W;"),
        ("env.capnp", "Crdt.Pair(Text, Crdt.Value)", "Crdt.Pair(Text, Crdt.Value, Data)"),
    ]),
    Safe("make-struct-generic-every-user-binds", _origin_generic_ops("Text")),
    Safe("list-to-list-of-struct-whose-first-field-is-the-element", [
        ("crdt.capnp", "tags @7 :List(Text);", "tags @7 :List(Tag);"),
        ("crdt.capnp", "  struct Map @", _TAG + "  struct Map @"),
    ]),
    Safe("new-field-next-ordinal", [
        ("crdt.capnp", "  meta :group", "  createdAt @9 :UInt64;\n  meta :group"),
    ]),
    Safe("new-field-in-struct-used-by-a-default", [
        ("env.capnp", "lane @4 :UInt16;", "lane @4 :UInt16;\n  region @5 :Text;"),
    ]),
    # Only the new field differs: old readers cannot see it, new ones read it either way.
    Safe("struct-default-sets-a-new-field", [
        ("env.capnp", "lane @4 :UInt16;", "lane @4 :UInt16;\n  region @5 :Text;"),
        ("env.capnp", "seq = 7)", 'seq = 7, region = "eu")'),
    ]),
    Safe("rename-field", [("crdt.capnp", "weight @5", "score @5")]),
    Safe("rename-struct", _sub_all(r"\bOrigin\b", "Source")),
    Safe("rename-group", [("crdt.capnp", "meta :group", "info :group")]),
    Safe("rename-enumerant", [("crdt.capnp", "register @0", "lww @0")]),
    Safe("rename-method", [("env.capnp", "put @0", "store @0")]),
    Safe("rename-result", [("env.capnp", "(accepted :Bool)", "(ok :Bool)")]),
    Safe("new-union-member", [
        ("crdt.capnp", "nested @4 :Map;", "nested @4 :Map;\n    real @9 :Float64;"),
    ]),
    Safe("new-struct-and-enum", [
        ("env.capnp", None, ENV + "struct Tombstone @0xc0ffee0000000025 {\n  at @0 :UInt64;\n}\n"
                                  "enum Mode @0xc0ffee0000000026 { a @0; }\n"),
    ]),
    Safe("new-nested-struct", [
        ("crdt.capnp", "  struct Map @",
         "  struct Stamp @0xc0ffee0000000015 {\n    at @0 :UInt64;\n  }\n\n  struct Map @"),
    ]),
    Safe("new-enumerant-at-end", [("crdt.capnp", "set @2;", "set @2;\n  map @3;")]),
    Safe("new-method", [
        ("env.capnp", "get @1 Origin -> Envelope;",
         "get @1 Origin -> Envelope;\n  del @2 (origin :Origin) -> ();"),
    ]),
    Safe("new-method-param-at-end", [
        ("env.capnp", "ttl :UInt32 = 60)", "ttl :UInt32 = 60, priority :UInt8)"),
    ]),
    Safe("comments", [
        ("crdt.capnp", "# A self-describing CRDT value.",
         "# A self-describing CRDT value.\n  # More words; struct Fake {}"),
        ("env.capnp", "seq @2 :UInt64 = 1;", "seq @2 :UInt64 = 1;  # since v1"),
    ]),
    Safe("reorder-fields-in-source", [
        ("crdt.capnp", "  kind @0 :Kind = counter;\n", ""),
        ("crdt.capnp", "  weight @5", "  kind @0 :Kind = counter;\n  weight @5"),
    ]),
    Safe("explicit-default-equal-to-implicit", [
        ("env.capnp", "zone @1 :Text;", 'zone @1 :Text = "";'),
        ("env.capnp", "shard @3 :UInt32;", "shard @3 :UInt32 = 0;"),
    ]),
    Safe("struct-default-spelled-differently", [
        ("env.capnp", '(node = "n", seq = 7)', '(seq = 7, node = "n")'),
    ]),
    Safe("import-style", [
        ("crdt.capnp", '"/env.capnp"', '"env.capnp"'),
        ("env.capnp", '"crdt.capnp"', '"/crdt.capnp"'),
    ]),
    Safe("new-file", [
        ("extra.capnp", None,
         "@0xc0ffee0000000003;\nstruct Extra @0xc0ffee0000000030 { x @0 :Int8; }\n"),
    ]),
]

# A syntax error in the middle of the batch: the worker dies there and resumes after it.
HOSTILE_OPS: list[Op] = [("crdt.capnp", "struct Value @", "struct Value @@ {")]


def _write(directory: Path, files: Mapping[str, str]) -> Path:
    directory.mkdir(parents=True)
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


@dataclass(frozen=True)
class Catalogue:
    base: Snapshot
    edited: Mapping[str, Snapshot]
    errors: list[str]


def _key(ops: list[Op]) -> str:
    return repr(ops)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> Catalogue:
    root = tmp_path_factory.mktemp("catalogue")
    all_ops = [c.ops for c in BREAKING] + [c.ops for c in SAFE]
    labelled = [("v1", _write(root / "base", BASE))]
    for i, ops in enumerate(all_ops[: len(all_ops) // 2]):
        labelled.append(("current", _write(root / f"e{i}", _apply(BASE, ops))))
    labelled.append(("current", _write(root / "hostile", _apply(BASE, HOSTILE_OPS))))
    for i, ops in enumerate(all_ops[len(all_ops) // 2:], start=len(all_ops) // 2):
        labelled.append(("current", _write(root / f"e{i}", _apply(BASE, ops))))
    parsed, _, errors = load_snapshots(labelled)
    by_dir = {s.directory: s for s in parsed}
    edited = {_key(ops): by_dir[root / f"e{i}"] for i, ops in enumerate(all_ops)}
    return Catalogue(by_dir[root / "base"], edited, errors)


@pytest.mark.parametrize("case", BREAKING, ids=[c.id for c in BREAKING])
def test_breaking_edit_is_caught_by_its_rule(catalogue: Catalogue, case: Case) -> None:
    found = check_snapshots([catalogue.base, catalogue.edited[_key(case.ops)]])

    assert case.rule in {v.rule for v in found}, [v.format() for v in found]
    assert {v.rule for v in found} == case.expected, [v.format() for v in found]
    assert all(v.pairs == ("v1 → current",) for v in found if v.rule != "ID_MISSING")


@pytest.mark.parametrize("safe", SAFE, ids=[c.id for c in SAFE])
def test_safe_edit_passes(catalogue: Catalogue, safe: Safe) -> None:
    found = check_snapshots([catalogue.base, catalogue.edited[_key(safe.ops)]])

    assert [v.format() for v in found] == []


def test_catalogue_covers_every_rule() -> None:
    # Two rules need inputs the shared base cannot hold, and have their own tests below:
    # CLOSED_STRUCT_EXTENDED (worknode's closed structs) and NODE_RENAMED (an implicit id).
    assert {c.rule for c in BREAKING} == set(RULES) - {"CLOSED_STRUCT_EXTENDED", "NODE_RENAMED"}


def test_worker_crash_costs_only_its_directory(catalogue: Catalogue) -> None:
    # The hostile directory sat in the middle of the fixture's batch; all others parsed.
    assert len(catalogue.edited) == len(BREAKING) + len(SAFE)
    assert len(catalogue.errors) == 1
    error = catalogue.errors[0]
    assert "hostile" in error
    assert re.search(r"/hostile/crdt\.capnp:\d+: failed: Parse error\.", error)
    assert "SIGABRT" in error


def test_violation_points_at_the_member_line(catalogue: Catalogue) -> None:
    ops: list[Op] = [("crdt.capnp", "int @2 :Int64;", "int @2 :UInt64;")]
    [violation] = check_snapshots([catalogue.base, catalogue.edited[_key(ops)]])

    edited = catalogue.edited[_key(ops)]
    assert violation.path == str(edited.directory / "crdt.capnp")
    assert violation.line == 17  # "    int @2 :UInt64;"
    assert violation.format() == (
        f"{edited.directory / 'crdt.capnp'}:17: TYPE_CHANGED: Value: field int @2: type "
        "changed from Int64 to UInt64 [v1 → current]"
    )


def test_id_missing_points_at_the_declaration(catalogue: Catalogue) -> None:
    [ops] = [c.ops for c in BREAKING if c.rule == "ID_MISSING"]
    found = check_snapshots([catalogue.base, catalogue.edited[_key(ops)]])

    [missing] = [v for v in found if v.rule == "ID_MISSING"]
    assert missing.line == 23
    assert "struct Heartbeat has no explicit @0x id" in missing.message


# --- whole-tree checks: releases, transitivity, the command line ----------------------------


def _project(root: Path, current: Mapping[str, str], **releases: Mapping[str, str]) -> Path:
    schemas = _write(root / "schemas", current)
    for name, files in releases.items():
        _write(schemas / "releases" / name, files)
    return schemas


def test_transitive_break_is_caught_only_against_the_oldest_release(tmp_path: Path) -> None:
    # v1 → v2 renames node to host; v2 → current renames zone to node. Each step is a safe
    # rename, but a v1 writer's "node" (@0) is read as "host" by current, whose "node" is @1.
    v2 = _apply(BASE, [("env.capnp", "node @0", "host @0"),
                       ("env.capnp", '(node = "n"', '(host = "n"')])
    current = _apply(v2, [("env.capnp", "zone @1", "node @1")])
    schemas = _project(tmp_path, current, v1=BASE, v2=v2)

    report = check(schemas, schemas / "releases")

    assert report.errors == ()
    assert report.pairs == ("v1 → v2", "v1 → current", "v2 → current")
    assert [(v.rule, v.pairs) for v in report.violations] == [
        ("ORDINAL_CHANGED", ("v1 → current",)),
    ]
    assert report.violations[0].path == str(schemas / "env.capnp")
    assert report.exit_code == 1


def test_cli_exit_codes_and_output_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = _apply(BASE, [("crdt.capnp", "int @2 :Int64;", "int @2 :UInt64;"),
                           ("crdt.capnp", "  set @2;\n", "")])
    _project(tmp_path / "ok", BASE, v1=BASE)
    _project(tmp_path / "bad", broken, v1=BASE, v2=BASE)
    runner = CliRunner()

    monkeypatch.chdir(tmp_path / "ok")  # the defaults: ./schemas and ./schemas/releases
    ok = runner.invoke(main, ["schema", "check"])
    monkeypatch.chdir(tmp_path)
    bad = runner.invoke(main, ["schema", "check", "--schemas", "bad/schemas"])

    assert ok.exit_code == 0, ok.output
    assert ok.stdout == ""
    assert "OK (1 pairs compared)" in ok.stderr
    assert bad.exit_code == 1, bad.output
    # A removal points at the older file's line; each change is printed once, with the
    # range of releases it breaks.
    assert bad.stdout.splitlines() == [
        "bad/schemas/crdt.capnp:16: TYPE_CHANGED: Value: field int @2: type changed from "
        "Int64 to UInt64 [v1..v2 → current]",
        "bad/schemas/releases/v2/crdt.capnp:9: ENUMERANT_REMOVED: Kind: enumerant set @2 was "
        "removed [v1..v2 → current]",
    ]
    line = re.compile(r"^[^:\s]+\.capnp(:\d+)?: [A-Z_]+: .+$")
    assert all(line.match(x) for x in bad.stdout.splitlines())


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    runner = CliRunner()
    _project(tmp_path, BASE)
    (tmp_path / "empty").mkdir()

    missing = runner.invoke(main, ["schema", "check", "--schemas", str(tmp_path / "nope")])
    empty = runner.invoke(main, ["schema", "check", "--schemas", str(tmp_path / "empty")])
    no_releases = runner.invoke(main, ["schema", "check", "--schemas",
                                       str(tmp_path / "schemas"), "--releases",
                                       str(tmp_path / "none")])

    assert missing.exit_code == 2
    assert "not a directory" in missing.stderr
    assert empty.exit_code == 2
    assert "no *.capnp files" in empty.stderr
    assert no_releases.exit_code == 2
    assert "not a directory" in no_releases.stderr


def test_cli_hostile_schema_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    hostile = _apply(BASE, [("env.capnp", "interface Store @", "interface Store { @"),
                            ("crdt.capnp", "@0xc0ffee0000000001;\n", "")])
    schemas = _project(tmp_path, hostile, v1=BASE)

    result = CliRunner().invoke(main, ["schema", "check", "--lint", "--schemas", str(schemas)])

    assert result.exit_code == 2
    # Parsing stops at the first bad file; whatever the sources show is still reported.
    assert f"warning: {schemas / 'crdt.capnp'}:1: ID_MISSING: file has no '@0x...;' id line" in (
        result.stdout)
    [error] = result.stderr.splitlines()
    assert error.startswith(f"error: {schemas}: cannot parse schema: {schemas}/")
    assert "failed:" in error
    assert "Traceback" not in result.output


def test_dump_reports_each_broken_directory(tmp_path: Path) -> None:
    good = _write(tmp_path / "good", BASE)
    missing_import = _write(tmp_path / "imp", {"a.capnp": '@0xc0ffee0000000005;\n'
                                                           'using import "nope.capnp".X;\n'})
    bad_ordinal = _write(tmp_path / "ord", {"a.capnp": "@0xc0ffee0000000006;\n"
                                                       "struct A @0xc0ffee0000000061 "
                                                       "{ a @1 :Int8; }\n"})

    out = dump_directories([missing_import, good, bad_ordinal])

    assert isinstance(out[good], dict)
    assert "Import failed: nope.capnp" in out[missing_import]
    assert "Ordinals must be sequential" in out[bad_ordinal]


def test_dump_timeout_is_an_error_per_directory(tmp_path: Path) -> None:
    first = _write(tmp_path / "a", BASE)
    second = _write(tmp_path / "b", BASE)

    out = dump_directories([first, second], timeout=0.001)

    assert out == {d: f"{d}: schema parser timed out after 0 s" for d in (first, second)}


# --- message format: one finding per change, old lines for removals, lint apart, JSON -------


def test_removal_points_at_the_old_line_once_with_its_release_range(tmp_path: Path) -> None:
    current = _apply(BASE, [("env.capnp", "  lane @4 :UInt16;\n", "")])
    schemas = _project(tmp_path, current, v1=BASE, v2=BASE)

    report = check(schemas, schemas / "releases")

    [removed] = report.violations
    lane_line = ENV.splitlines().index("  lane @4 :UInt16;") + 1
    assert (removed.rule, removed.path, removed.line) == (
        "FIELD_REMOVED", str(schemas / "releases" / "v2" / "env.capnp"), lane_line)
    assert (removed.struct, removed.field, removed.ordinal) == ("Origin", "lane", 4)
    assert removed.pairs == ("v1 → current", "v2 → current")
    assert removed.releases == "v1..v2 → current"
    assert removed.format().endswith("Origin: field lane @4 was removed [v1..v2 → current]")


def _dirs(root: Path, **dirs: Mapping[str, str]) -> list[Path]:
    return [_write(root / name, files) for name, files in dirs.items()]


_BEAT = "@0xc0ffee0000000101;\nstruct Beat {\n  at @0 :UInt64;\n}\n" \
        "struct Use @0xc0ffee0000000102 {\n  beat @0 :Beat;\n}\n"


def test_type_renamed_without_explicit_id_reads_as_renamed(tmp_path: Path) -> None:
    old, new, gone = _dirs(
        tmp_path, old={"a.capnp": _BEAT},
        new={"a.capnp": _BEAT.replace("Beat", "Pulse")},
        gone={"a.capnp": _BEAT.replace("struct Beat {\n  at @0 :UInt64;\n}\n", "")
              .replace("beat @0 :Beat;", "beat @0 :Text;")},
    )

    renamed = check_directories(old, new)
    removed = check_directories(old, gone)

    # One finding, not one per field that refers to the type.
    [finding] = renamed.violations
    assert finding.rule == "NODE_RENAMED"
    assert (finding.old, finding.new) == ("Beat", "Pulse")
    assert "struct Beat was renamed to Pulse and its id changed" in finding.message
    assert re.search(r"declare `struct Pulse @0x[0-9a-f]{16}` to keep the old id",
                     finding.message)
    assert [w.rule for w in renamed.warnings] == ["ID_MISSING"]  # lint, not breaking
    assert renamed.exit_code == 1
    assert {v.rule for v in removed.violations} == {"NODE_REMOVED", "TYPE_CHANGED"}
    [missing] = [v for v in removed.violations if v.rule == "NODE_REMOVED"]
    assert "struct Beat (0x" in missing.message
    assert "is missing: no node has its id" in missing.message
    assert missing.path == str(old / "a.capnp")
    assert missing.line == 2  # the old declaration


def test_cli_lint_warnings_are_apart_from_breaking_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A new struct without an explicit id breaks no reader: lint, not a breaking change.
    lint_only = _apply(BASE, [("env.capnp", None, ENV + "struct Extra {\n  x @0 :Int8;\n}\n")])
    _project(tmp_path, lint_only, v1=BASE)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    plain = runner.invoke(main, ["schema", "check"])
    linted = runner.invoke(main, ["schema", "check", "--lint"])

    assert plain.exit_code == 0, plain.output
    assert plain.stdout == ""
    assert linted.exit_code == 3, linted.output
    extra_line = len(ENV.splitlines()) + 1
    assert linted.stdout.splitlines() == [
        f"warning: schemas/env.capnp:{extra_line}: ID_MISSING: struct Extra has no explicit "
        "@0x id",
    ]


def test_cli_json_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = _apply(BASE, [("crdt.capnp", "int @2 :Int64;", "int @2 :UInt64;")])
    _project(tmp_path, broken, v1=BASE, v2=BASE)
    monkeypatch.chdir(tmp_path)

    result = CliRunner().invoke(main, ["schema", "check", "--format", "json"])

    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert out["exit_code"] == 1
    assert out["errors"] == []
    assert out["warnings"] == []
    assert out["pairs"] == ["v1 → v2", "v1 → current", "v2 → current"]
    assert out["findings"] == [{
        "file": "schemas/crdt.capnp", "line": 17, "rule": "TYPE_CHANGED", "kind": "breaking",
        "struct": "Value", "field": "int", "ordinal": 2, "old": "Int64", "new": "UInt64",
        "message": "Value: field int @2: type changed from Int64 to UInt64",
        "releases": "v1..v2 → current", "pairs": ["v1 → current", "v2 → current"],
    }]


# --- the generic form: any two directories, with import paths --------------------------------

_COMMON = "@0xc0ffee0000000201;\nstruct Stamp @0xc0ffee0000000202 {\n  at @0 :UInt64;\n}\n"
_APP = """\
@0xc0ffee0000000203;
using Common = import "/common.capnp";
struct Event @0xc0ffee0000000204 {
  stamp @0 :Common.Stamp;
  name @1 :Text;
}
"""


def _worknode(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120, check=False)


def test_generic_form_compares_any_two_directories_with_import_paths(tmp_path: Path) -> None:
    [inc] = _dirs(tmp_path, inc={"common.capnp": _COMMON})
    old, safe, bad = _dirs(
        tmp_path / "sets", old={"app.capnp": _APP},
        safe={"app.capnp": _APP.replace("  name @1 :Text;\n",
                                        "  name @1 :Text;\n  kind @2 :UInt8;\n")},
        bad={"app.capnp": _APP.replace("name @1 :Text;", "name @1 :Data;")},
    )

    ok = _worknode("schema", "check", old, safe, "-I", inc)
    broken = _worknode("schema", "check", old, bad, "-I", inc)
    no_import = _worknode("schema", "check", old, bad)

    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == ""
    assert broken.returncode == 1, broken.stderr
    assert broken.stdout.splitlines() == [
        f"{bad / 'app.capnp'}:5: TYPE_CHANGED: Event: field name @1: type changed from Text "
        "to Data [old → bad]",
    ]
    assert no_import.returncode == 2
    assert "common.capnp" in no_import.stderr
    assert "Traceback" not in no_import.stderr


def test_generic_form_usage_errors(tmp_path: Path) -> None:
    [one] = _dirs(tmp_path, one={"app.capnp": _APP})
    runner = CliRunner()

    single = runner.invoke(main, ["schema", "check", str(one)])
    bad_import = runner.invoke(main, ["schema", "check", str(one), str(one), "-I",
                                      str(tmp_path / "nope")])

    assert single.exit_code == 2
    assert "exactly two" in single.output
    assert bad_import.exit_code == 2
    assert "not a directory" in bad_import.output


# --- closed structs (the evolution table) on worknode's own schemas --------------------------


def _frozen_in_comments() -> set[str]:
    """Structs whose schema comment (the lines right after the declaration) says Frozen."""
    text = (CURRENT_DIR / "crdt.capnp").read_text() + (CURRENT_DIR / "rpc.capnp").read_text()
    found = set()
    for m in re.finditer(r"^struct (\w+) @0x[0-9a-f]+ \{\n((?:\s*#[^\n]*\n)*)", text, re.M):
        if "Frozen" in m.group(2):
            found.add(m.group(1))
    return found


def test_closed_structs_refuse_any_addition(tmp_path: Path) -> None:
    crdt = (CURRENT_DIR / "crdt.capnp").read_text()
    dot_end = "  counter @1 :UInt64;      # >= 1\n}"
    item_end = "  payload @2 :Payload;\n}"
    doc_end = ("  delta @3 :Bool;          # true: a delta (may carry markers); false: a full "
               "state\n}")
    value_end = "    data @5 :Data;         # at most 256 KiB\n"
    ctx_end = ("  cloud @1 :List(Dot);     # dots seen out of order, above the version vector; "
               "sorted\n}")
    el_end = "  dots @1 :List(Dot);      # sorted\n}"
    absent = "    absent @6 :Void;               # with `whole`: the subtree is gone\n"
    entry_end = absent + "  }\n}"
    lww_end = "      value @1 :Value;\n"
    flag_end = "    flag @5 :Void;"
    mutants = {
        "dot": crdt.replace(dot_end, dot_end[:-1] + "  epoch @2 :UInt32;\n}"),
        "item": crdt.replace(item_end, item_end[:-1] + "  note @3 :Text;\n}"),
        "document": crdt.replace(doc_end, doc_end[:-1] + "  note @4 :Text;\n}"),
        "value": crdt.replace(value_end, value_end + "    uuid @6 :Data;\n"),
        "kind": crdt.replace(flag_end, flag_end + "\n    future :group {\n      a @6 :UInt8;"
                             "\n      b @7 :Value;\n    }"),
        "lww": crdt.replace(lww_end, lww_end + "      origin @6 :Text;\n"),
        "counter": crdt.replace("      decrements @4 :UInt64;\n",
                                "      decrements @4 :UInt64;\n      floor @6 :Int64;\n"),
        "context": crdt.replace(ctx_end, ctx_end[:-1] + "  epoch @2 :UInt64;\n}"),
        "element": crdt.replace(el_end, el_end[:-1] + "  weight @2 :UInt32;\n}"),
        "entry": crdt.replace(entry_end, entry_end[:-1] + "  note @7 :Text;\n}"),
        "entry-member": crdt.replace(absent, absent + "    tombstone @7 :UInt64;\n"),
    }
    assert all(m != crdt for m in mutants.values())
    dirs = {}
    for name, text in mutants.items():
        files = {p.name: p.read_text() for p in CURRENT_DIR.glob("*.capnp")}
        dirs[name] = _write(tmp_path / name, files | {"crdt.capnp": text})
    releases = [(f"v{v}", release_dir(v)) for v in SUPPORTED_VERSIONS]
    parsed, _, errors = load_snapshots([*releases, *(("current", d) for d in dirs.values())])
    assert errors == []
    olds, by_dir = parsed[:len(releases)], {s.directory: s for s in parsed[len(releases):]}

    def findings(name: str) -> list[tuple[str, str, str, int | None, str]]:
        found = check_snapshots([*olds, by_dir[dirs[name]]])
        return [(v.rule, v.struct, v.field, v.ordinal, v.releases) for v in found]

    span = f"v1..v{SUPPORTED_VERSIONS[-1]} → current"
    assert findings("dot") == [("CLOSED_STRUCT_EXTENDED", "Dot", "epoch", 2, span)]
    assert findings("item") == [("CLOSED_STRUCT_EXTENDED", "Item", "note", 3, span)]
    assert findings("document") == [("CLOSED_STRUCT_EXTENDED", "Document", "note", 4, span)]
    # Value and Payload: a new union member passes (older readers keep it whole) ...
    assert findings("value") == []
    assert findings("kind") == []
    # ... a field inside an existing member's group does not (it would be dropped on relay).
    assert findings("lww") == [("CLOSED_STRUCT_EXTENDED", "Payload", "lww.origin", 6, span)]
    assert findings("counter") == [
        ("CLOSED_STRUCT_EXTENDED", "Payload", "counter.floor", 6, span)]
    assert findings("context") == [("CLOSED_STRUCT_EXTENDED", "Context", "epoch", 2, span)]
    assert findings("element") == [("CLOSED_STRUCT_EXTENDED", "SetElement", "weight", 2, span)]
    assert findings("entry") == [("CLOSED_STRUCT_EXTENDED", "Entry", "note", 7, span)]
    assert findings("entry-member") == [
        ("CLOSED_STRUCT_EXTENDED", "Entry", "tombstone", 7, span)]


def test_evolution_table_names_the_structs_the_schemas_call_frozen() -> None:
    parsed, _, errors = load_snapshots([("current", CURRENT_DIR)])
    assert errors == []
    names = {parsed[0].nodes[i].qualname for i in closed_structs()}
    assert _frozen_in_comments() == {"Dot", "Item"}
    assert names == {"Dot", "Item", "Context", "SetElement", "Entry", "Document", "Argument"}
    assert {parsed[0].nodes[i].qualname for i in union_only_structs()} == {"Value", "Payload"}
    assert all(STRUCT_EVOLUTION[i] == CLOSED for i in closed_structs())


# --- the rule table in the README -------------------------------------------------------------


def test_readme_rule_table_lists_every_rule_once() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    # The wire's rules (the kinds' own table, further on, has its own test).
    wire = readme[readme.index("## The wire"):readme.index("## Kinds and schema evolution")]
    rows = re.findall(r"^\| `([A-Z_]+)` \| (breaking|lint) \|", wire, re.M)
    assert sorted(rule for rule, _ in rows) == sorted(RULES)
    assert {rule: kind for rule, kind in rows} == {k: r.kind for k, r in RULES.items()}


def test_a_struct_a_new_value_member_carries_is_closed_too(tmp_path: Path) -> None:
    """The review's case: a release adds ``decimal @6 :Decimal`` to Value; a later one adds a
    field to ``Decimal``. Readers that know ``decimal`` rebuild it and would drop the field on
    relay: every unlisted struct of crdt.capnp is closed."""
    crdt = (CURRENT_DIR / "crdt.capnp").read_text()
    value_end = "    data @5 :Data;         # at most 256 KiB\n"
    base = crdt.replace(value_end, value_end + "    decimal @6 :Decimal;\n") + (
        "\nstruct Decimal @0xf1c3a5e7d9b2c4a6 {\n  mantissa @0 :Int64;\n}\n")
    grown = base.replace("  mantissa @0 :Int64;\n", "  mantissa @0 :Int64;\n  exponent @1 :Int8;\n")
    files = {p.name: p.read_text() for p in CURRENT_DIR.glob("*.capnp")}
    old = _write(tmp_path / "old", files | {"crdt.capnp": base})
    new = _write(tmp_path / "new", files | {"crdt.capnp": grown})
    parsed, _, errors = load_snapshots([("old", old), ("new", new)])
    assert errors == []
    found = [(v.rule, v.struct, v.field) for v in check_snapshots(parsed)]
    assert found == [("CLOSED_STRUCT_EXTENDED", "Decimal", "exponent")]
