"""The short Jepsen-style run (CI) and its EVENTUAL control (see ``_harness``).

STRONG: the history of reads, writes and CAS under a minority partition and a killed server
must be linearizable per key (an UNKNOWN verdict fails too: it is reported, never taken for
a pass); no STRONG operation succeeds on a node whose server is cut from the quorum while
LOCAL/EVENTUAL writes there do; after healing every node reads (and holds locally, without a
fence) the same value of every key, the last acknowledged one where the history makes it
definite. EVENTUAL: the same workload on non-STRONG keys with local reads must be flagged,
which shows the checker and the recording can fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.lincheck import Verdict
from tests.jepsen._harness import RunResult, last_acknowledged, run, save_history

pytestmark = pytest.mark.slow

FAILED = Path(__file__).parent / "results" / "failed"


def _keep(res: RunResult, name: str) -> str:
    """Save the history for replay; where it went, for the assertion message."""
    path = save_history(res, FAILED / f"{name}-seed{res.seed}.jsonl")
    return f"history in {path} (python -m broker.lincheck {path})"


async def test_strong_history_under_partitions_and_kills_is_linearizable(
    tmp_path: Path,
) -> None:
    res = await run(tmp_path, mode="strong", seed=18, seconds=6, keys=8,
                    schedule=("minority", "kill-server"), check_budget=20)
    assert res.result is not None
    if res.result.verdict is not Verdict.OK:
        raise AssertionError(f"{res.result.explain()}; {_keep(res, 'strong')}")
    assert not res.stuck, f"{res.stuck}; {_keep(res, 'strong')}"
    assert {"minority", "kill-server"} <= set(res.faults)
    assert res.minority, "the nemesis never cut a node from the quorum"
    assert not res.violations, res.violations[:10]
    assert res.side_writes_ok >= 2
    assert not res.side_writes_failed
    assert sum(not op.indeterminate for op in res.history if op.f != "read") > 0
    final = res.final
    keys = [k for k in final[0] if k != "_local"]
    for node, got in final.items():
        for key in keys:
            assert got[key] == final[0][key], (node, key)
            assert got["_local"][key] == got[key], (node, key)  # applied here, no fence
    for key in keys:
        known, value = last_acknowledged(res.history, key)
        if known:
            assert final[0][key] == value, key


async def test_the_eventual_control_is_flagged(tmp_path: Path) -> None:
    res = await run(tmp_path, mode="eventual", seed=18, seconds=2, keys=4,
                    schedule=("minority",), check_budget=20)
    assert res.result is not None
    assert res.result.verdict is Verdict.ILLEGAL, res.result.explain()
    _keep(res, "eventual-control")  # a known non-linearizable history, for replay
