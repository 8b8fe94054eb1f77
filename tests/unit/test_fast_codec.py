"""The fast codec (``broker/codec/_fast.py``, ``_fast_write.py``) reads exactly what pycapnp
reads and writes exactly the bytes pycapnp writes.

- its layouts are generated from the schemas (``gen_layouts --check``);
- every golden vector of every release, and ``DOCUMENTS_CI`` generated documents (every kind,
  nesting to the limit, deltas with markers, big and small values), are read by the fast path
  (not a fallback) into the document pycapnp builds (the long run: ``python -m
  tests.fuzz._documents --documents 100000``, summary in ``bench/results/fast_codec_proof.md``);
- on mutated bytes the fast reader raises only ``CodecError``s and never accepts what pycapnp
  refuses or reads it differently (the signed variant runs in subprocesses: the
  ``codec-differential`` fuzz target);
- the fast writer's segments, and so packed documents and sealed envelopes, are byte-identical
  to pycapnp's on the golden documents and the generated ones;
- the differential check can fail: a wrong layout offset (reader or writer) is caught.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from broker.codec import TrustRoster, WireCodec, _fast_write, _packed, gen_layouts
from broker.codec import _fast as fast_mod
from broker.codec._document import encode_document
from broker.codec._fast import read_document, unpack
from broker.codec._fast_write import write_document
from broker.codec._layouts import VALUE_INT, VALUE_WHICH
from broker.codec._packed import segment_words
from broker.crdt import Causal, LWWRegister, ORSet
from broker.errors import CodecError
from tests.fuzz._documents import T0, check, documents, wide
from tests.fuzz._documents import run as run_documents
from tests.fuzz._targets import mutate_message
from tests.golden.generate import SIGNER_ID, signer

DOCUMENTS_CI = 10_000
GOLDEN = Path(__file__).resolve().parents[1] / "golden"
FAST = WireCodec()
ORACLE = WireCodec(fast=False)


def test_layouts_module_is_what_the_schemas_give(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert gen_layouts.main(["--check"]) == 0
    # The check fails on a stale module (one offset changed by hand).
    stale = tmp_path / "_layouts.py"
    stale.write_text(gen_layouts.OUT.read_text().replace("ITEM_COUNTER: Final = 8",
                                                         "ITEM_COUNTER: Final = 16"))
    monkeypatch.setattr(gen_layouts, "OUT", stale)
    assert gen_layouts.main(["--check"]) == 1


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("v*/*.doc")), ids=lambda p: p.parent.name
                         + "/" + p.name)
def test_golden_documents_are_read_by_the_fast_path_as_pycapnp_reads_them(path: Path) -> None:
    packed = path.read_bytes()
    expected = ORACLE.decode_document(packed)
    parsed = FAST.schema.crdt.Document.from_bytes_packed(packed)
    assert FAST.fast_decode(parsed, None, segment_words(packed)) == expected
    assert read_document(unpack(packed), FAST.schema.kinds) == expected
    assert FAST.decode_document(packed) == expected
    # The fast writer writes it back word for word as pycapnp does.
    assert [write_document(expected, FAST.schema.kinds)] == encode_document(
        ORACLE.schema, expected
    ).to_segments()


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("v*/*.env")), ids=lambda p: p.parent.name
                         + "/" + p.name)
def test_golden_envelopes_open_alike(path: Path) -> None:
    roster = TrustRoster({SIGNER_ID: signer().public_key})
    data = path.read_bytes()
    assert FAST.open(data, roster) == ORACLE.open(data, roster)
    assert FAST.open(data, roster, keep_packed=True) == ORACLE.open(data, roster, keep_packed=True)


def test_generated_documents_are_read_alike() -> None:
    summary = run_documents(DOCUMENTS_CI, seed=19)
    assert summary["documents"] == DOCUMENTS_CI
    assert set(summary["by_type"]) == {
        "ORMap", "LWWRegister", "MVRegister", "PNCounter", "ORSet", "EWFlag"
    }


def _check_many(seed: int) -> None:
    for _, doc in zip(range(500), documents(random.Random(seed)), strict=False):
        check(FAST, ORACLE, doc)


def _check_all(docs: list[Causal]) -> None:
    for doc in docs:
        check(FAST, ORACLE, doc)


def test_the_check_passes_unpatched() -> None:
    _check_many(3)
    _check_many(4)


def test_a_wrong_layout_offset_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # Int64 values read 8 bytes early (the discriminant's word): content differs from pycapnp.
    wrong = fast_mod._layout((VALUE_WHICH, "H"), (VALUE_INT - 8 + 2, "q"))
    monkeypatch.setattr(fast_mod, "_VALUE", wrong)
    with pytest.raises(AssertionError):
        _check_many(3)


def test_a_wrong_register_read_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # The one-read path of int registers (``_REGISTER``) is taken and checked: a value off by
    # one there is caught.
    right = fast_mod._REGISTER

    def wrong(m: bytes, at: int) -> tuple[int, ...]:
        *fields, x = right(m, at)
        return (*fields, x + 1)

    monkeypatch.setattr(fast_mod, "_REGISTER", wrong)
    with pytest.raises(AssertionError):
        _check_many(3)


def test_a_wrong_path_read_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # The one-entry map path (``_Reader.one``) is taken and checked: a key changed there is
    # caught.
    right = fast_mod._Reader.one

    def wrong(self: fast_mod._Reader, m: bytes, size: int, tag: int, depth: int) -> object:
        got = right(self, m, size, tag, depth)
        return None if got is None else type(got)({k + "!": v for k, v in got.items()})

    monkeypatch.setattr(fast_mod._Reader, "one", wrong)
    with pytest.raises(AssertionError):
        _check_many(3)


def test_a_wrong_struct_size_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # A layout that refuses every valid Item is caught too (the fast path must be taken).
    monkeypatch.setattr(fast_mod, "_ITEM_SHAPE", fast_mod._ITEM_SHAPE + 1)
    with pytest.raises(AssertionError):
        _check_many(4)


def test_a_wrong_writer_offset_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # An item's counter written 4 bytes early: other bytes than pycapnp's.
    monkeypatch.setattr(_fast_write, "ITEM_COUNTER", _fast_write.ITEM_COUNTER - 4)
    with pytest.raises(AssertionError):
        _check_many(5)


@pytest.mark.parametrize("big", ["register text", "register data", "set text", "set data"])
def test_texts_are_charged_to_the_traversal_budget(
    big: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A document of a few structs and one 40 KiB text or data: read with a budget of 64 words
    # (TRAVERSAL_FACTOR 0) it is refused, so its bytes were charged before being decoded
    # (shared pointers to one big text would otherwise amplify the work). Fails without the
    # charges: the structs alone fit in 64 words.
    value: str | bytes = "x" * 40_000 if big.endswith("text") else b"x" * 40_000
    doc: Causal = (
        LWWRegister().assign("r0", value, 1) if big.startswith("register")
        else ORSet().add("r0", value)
    )
    words = unpack(ORACLE.encode_document(doc))
    assert read_document(words, FAST.schema.kinds) == doc
    monkeypatch.setattr(fast_mod, "TRAVERSAL_FACTOR", 0)
    with pytest.raises(CodecError):
        read_document(words, FAST.schema.kinds)


def test_segment_words_reads_a_one_segment_table_from_its_first_bytes() -> None:
    # The one-segment shortcut gives what unpacking the table gives, on valid, mutated and
    # truncated streams (fails if the shortcut misreads the tag's bits or their order).
    rng = random.Random(7)
    seeds = [ORACLE.encode_document(d) for _, d in zip(range(100), documents(rng), strict=False)]
    seeds.append(bytes([0x50, 0x12, 0x34]))  # bytes 4 and 6 of the size: 0x340012
    for i in range(5_000):
        data = mutate_message(rng, seeds[i % len(seeds)]) if i >= len(seeds) else seeds[i]
        for cut in (data, data[: rng.randrange(0, 6)]):
            assert segment_words(cut) == _packed._segment_words(cut), cut[:12]
    assert segment_words(bytes([0x50, 0x12, 0x34])) == 0x340012


def test_mutated_bytes_never_read_differently() -> None:
    # The pure reader over unpack() on hostile words: only CodecErrors, and whatever it
    # accepts pycapnp accepts with equal content (it may refuse more: the codec falls back).
    rng = random.Random(11)
    seeds = [ORACLE.encode_document(d) for _, d in zip(range(60), documents(rng), strict=False)]
    accepted = refused = 0
    for i in range(3_000):
        data = mutate_message(rng, seeds[i % len(seeds)])
        try:
            got = read_document(unpack(data), FAST.schema.kinds)
        except CodecError:
            refused += 1
            continue
        accepted += 1
        assert ORACLE.decode_document(data) == got, i
        assert FAST.decode_document(data) == got, i
    assert accepted
    assert refused


def test_the_hot_path_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # With pycapnp's decoder disabled, valid envelopes still open (fails without the switch).
    import broker.codec._wire as wire

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the pycapnp decoder ran")

    rng = random.Random(5)
    docs = [d for _, d in zip(range(40), documents(rng), strict=False)]
    s = signer()
    roster = TrustRoster({SIGNER_ID: s.public_key})
    sealed = [FAST.seal(s, subject="wn.t", hlc=1, sequence=1, document=d) for d in docs]
    monkeypatch.setattr(wire, "decode_document", refuse)
    for d, env in zip(docs, sealed, strict=True):
        assert FAST.open(env, roster).document == d


@pytest.mark.parametrize("layout", ["_PATH", "_COUNTER"])
def test_a_wrong_fused_read_is_caught(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The one-read paths of ``entries`` (a path's int register under a short key:
    # ``_PATH``; a one-entry counter: ``_COUNTER``) are taken and checked: their last field
    # (the value, the decrements) off by one there is caught.
    right = getattr(fast_mod, layout)

    def wrong(m: bytes, at: int) -> tuple[int, ...]:
        *fields, x = right(m, at)
        return (*fields, x + 1)

    monkeypatch.setattr(fast_mod, layout, wrong)
    shape = 1 if layout == "_PATH" else 2  # paths, counters: fewer than read as columns
    with pytest.raises(AssertionError):
        _check_all([wide(random.Random(n), T0, shape, n) for n in range(1, fast_mod._COLUMNS_MIN)])


def test_a_wrong_dot_column_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # Dots are read as columns of words (``dot_rows``): the counters read from the replica's
    # word instead are caught.
    monkeypatch.setattr(fast_mod, "_DOT_N_WORD", fast_mod._DOT_R_WORD)
    with pytest.raises(AssertionError):
        _check_many(3)


def _spy_columns(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each call of the column readers read its list (True) or left it (False)."""
    taken: list[bool] = []
    for name in ("columns", "element_columns"):
        right = getattr(fast_mod._Reader, name)

        def spy(self: fast_mod._Reader, *args: Any, _right: Any = right) -> Any:
            got = _right(self, *args)
            taken.append(got is not None)
            return got

        monkeypatch.setattr(fast_mod._Reader, name, spy)
    return taken


@pytest.mark.parametrize("shape", ["registers", "paths", "counters", "set texts"])
def test_wide_lists_are_read_as_columns(shape: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Many writes of one shape under short keys are read as columns, into what pycapnp reads
    # (fails if the column readers leave such lists to the loops); past the sizes whose
    # masks are cached too (300).
    taken = _spy_columns(monkeypatch)
    for n in (8, 20, 65, 300):
        doc = wide(random.Random(n), T0, ["registers", "paths", "counters", "set texts"].index(
            shape), n)
        check(FAST, ORACLE, doc)
    assert taken
    assert all(taken)


@pytest.mark.parametrize("wrong", ["registers", "paths", "counters", "set texts"])
def test_a_wrong_column_read_is_caught(wrong: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A column read wrong (the last one read from the one before it; a set text's first
    # byte changed) is caught by the differential check: the columns are taken, and checked.
    if wrong == "set texts":
        right = fast_mod._WORD
        monkeypatch.setattr(fast_mod, "_WORD", lambda w: right(w ^ 1))
    else:
        shape = {"registers": fast_mod._REGISTERS, "paths": fast_mod._PATHS,
                 "counters": fast_mod._COUNTERS}[wrong]
        r, n, x, _ = shape.cols
        monkeypatch.setattr(shape, "cols", (r, n, x, x))  # the value (decrements) := hlc (inc)
    docs = [wide(random.Random(n), T0, ["registers", "paths", "counters", "set texts"].index(
        wrong), n) for n in (8, 20, 65)]
    with pytest.raises(AssertionError):
        _check_all(docs)


def test_mutated_wide_lists_never_read_differently(monkeypatch: pytest.MonkeyPatch) -> None:
    # The column readers on hostile words (mutated wide batches): only CodecErrors, and what
    # the fast reader accepts pycapnp accepts with equal content; some mutated lists are
    # still read as columns (a changed value), others left to the loops (a broken layout).
    taken = _spy_columns(monkeypatch)
    rng = random.Random(23)
    seeds = [ORACLE.encode_document(wide(random.Random(i), T0, i % 4, 8 + i)) for i in range(16)]
    accepted = refused = 0
    for i in range(3_000):
        data = mutate_message(rng, seeds[i % len(seeds)])
        try:
            got = read_document(unpack(data), FAST.schema.kinds)
        except CodecError:
            refused += 1
            continue
        accepted += 1
        assert ORACLE.decode_document(data) == got, i
        assert FAST.decode_document(data) == got, i
    assert accepted
    assert refused
    assert any(taken)
    assert not all(taken)


@pytest.mark.parametrize("shape", ["registers", "paths", "counters", "set texts"])
def test_column_compares_check_what_the_mask_checks(shape: str) -> None:
    # A wide list's words are compared column by column (``_fits``, lists of _COLUMNS_AT
    # bytes and more) or as one masked big int: both refuse exactly the same bytes. Every
    # byte of a list of 20, changed, is refused by both or by neither; the list as written
    # passes both. (Fails if a column compare misses a fixed byte or checks a varying one.)
    i = ["registers", "paths", "counters", "set texts"].index(shape)
    doc = wide(random.Random(5), T0, i, 20)
    seg = bytearray(unpack(ORACLE.encode_document(doc))[8:])
    found: list[tuple[int, int]] = []
    name = "element_columns" if shape == "set texts" else "columns"
    right = getattr(fast_mod._Reader, name)

    def spy(self: fast_mod._Reader, m: bytes, at: int, count: int, *rest: Any) -> Any:
        found.append((at, count))
        return right(self, m, at, count, *rest)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fast_mod._Reader, name, spy)
        read_document(b"\0\0\0\0" + (len(seg) // 8).to_bytes(4, "little") + bytes(seg),
                      FAST.schema.kinds)
    (at, count), = [f for f in found if f[1] == 20]
    if shape == "set texts":
        stride, words = fast_mod._SET_ELEMENT_BYTES, fast_mod._ELEMENT_WORDS
        args: Any = (fast_mod._element_fields(), fast_mod._ELEMENT_MASK,
                     fast_mod._ELEMENT_PATTERN)
    else:
        cols = {"registers": fast_mod._REGISTERS, "paths": fast_mod._PATHS,
                "counters": fast_mod._COUNTERS}[shape]
        stride, words = fast_mod._ENTRY_BYTES, cols.words
        args = (cols.layout(count), cols.mask, cols.pattern)
    mask, pattern = fast_mod._list_layout(count, stride, words, *args)
    checks = fast_mod._list_checks(count, stride, words, *args)
    stop = at + (stride + 8 * words) * count
    assert int.from_bytes(seg[at:stop], "little") & mask == pattern
    assert fast_mod._fits(memoryview(bytes(seg[at:stop])), checks)
    fixed = 0
    for b in range(at, stop):
        for flip in (1, 0x80):
            seg[b] ^= flip
            region = bytes(seg[at:stop])
            seg[b] ^= flip
            masked = int.from_bytes(region, "little") & mask == pattern
            assert fast_mod._fits(memoryview(region), checks) == masked, (b - at, flip)
            fixed += not masked
    assert fixed


def _text_sets(texts: list[list[str]]) -> list[Causal]:
    docs: list[Causal] = []
    for batch in texts:
        state, delta = ORSet(), ORSet(is_delta=True)
        for i, text in enumerate(batch):
            d = state.add(SIGNER_ID if i % 3 else "other-1", text)
            state.merge(d)
            delta.merge(d)
        docs += [state, delta]
    return docs


_NOT_ASCII = [[f"é{i}" for i in range(n)] for n in (8, 20, 90)] + [
    ["", *(f"t{i}" for i in range(12))],  # an empty text: not read by one decode
    [f"ü-{i:02}" for i in range(40)],  # 7 bytes
]


def test_set_texts_not_ascii_are_read_as_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    # Short texts that are not ASCII, or empty, are read as columns too, into what pycapnp
    # reads.
    taken = _spy_columns(monkeypatch)
    for doc in _text_sets(_NOT_ASCII):
        check(FAST, ORACLE, doc)
    assert taken
    assert all(taken)


def test_a_wrong_set_text_read_word_by_word_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    right = fast_mod._WORD
    monkeypatch.setattr(fast_mod, "_WORD", lambda w: right(w ^ 1))
    with pytest.raises(AssertionError):
        _check_all(_text_sets(_NOT_ASCII))


def test_column_keys_are_taken_only_with_their_length() -> None:
    # A key word is its key only with the size it was checked with (its first NUL): the
    # same word under another size is left to the loop (fails if the size check is lost).
    words = [int.from_bytes(k.encode().ljust(8, b"\0"), "little") for k in ("ab", "é", "xyz")]
    his = [(n + 1) << 3 | 2 for n in (2, 2, 3)]
    assert fast_mod._column_keys(words, his) == ["ab", "é", "xyz"]
    assert fast_mod._column_keys(words, his) == ["ab", "é", "xyz"]  # (from the cache)
    for i in range(3):
        for size in range(1, 9):
            wrong = his.copy()
            wrong[i] = (size << 3) | 2
            if wrong != his:
                assert fast_mod._column_keys(words, wrong) is None, (i, size)


def test_column_keys_cycling_past_the_old_bound_stay_cached_and_the_cache_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 10,000 short keys written over and over (the distinct-field workload, or 10,000
    # worknodes): a second pass finds every key in the cache (with the old bound of 4,096
    # every key missed and was decoded again); and a flood of distinct keys never grows the
    # cache past its bound (it is cleared and refilled).
    def words_of(keys: list[str]) -> tuple[list[int], list[int]]:
        raw = [k.encode() for k in keys]
        return ([int.from_bytes(b.ljust(8, b"\0"), "little") for b in raw],
                [(len(b) + 1) << 3 | 2 for b in raw])

    monkeypatch.setattr(fast_mod, "_WORD_KEYS", {})  # what other tests left out of it
    monkeypatch.setattr(fast_mod, "_KEY_HI", {})
    keys = [f"k{i}" for i in range(10_000)]
    for start in range(0, len(keys), 500):
        assert fast_mod._column_keys(*words_of(keys[start:start + 500])) == keys[start:start + 500]
    new: list[bytes] = []
    real_new_key = fast_mod._new_key
    monkeypatch.setattr(fast_mod, "_new_key", lambda raw: new.append(raw) or raw[:-1].decode())
    for start in range(0, len(keys), 500):
        assert fast_mod._column_keys(*words_of(keys[start:start + 500])) == keys[start:start + 500]
    assert new == []  # all from the cache
    monkeypatch.setattr(fast_mod, "_new_key", real_new_key)
    bound = fast_mod._WORD_KEY_CACHE
    for start in range(0, bound + 5_000, 1_000):
        flood = [f"z{i:05x}" for i in range(start, start + 1_000)]
        # (None when the cache was cleared while reading this list: the loop reads it)
        assert fast_mod._column_keys(*words_of(flood)) in (None, flood)
        assert len(fast_mod._WORD_KEYS) <= bound
        assert len(fast_mod._KEY_HI) <= bound + 1_000
