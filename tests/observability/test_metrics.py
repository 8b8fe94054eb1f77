"""Every service's ``/metrics`` passes ``promtool check metrics`` with nothing to report, and
shows what a rolling upgrade needs: the wire version each node writes and the ones it read."""

from __future__ import annotations

import asyncio
import subprocess
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from broker.codec import CURRENT_VERSION
from tests.observability.stack import NODES, generate_traffic, running_stack


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()  # type: ignore[no-any-return]


async def _scrape_all(urls: dict[str, str]) -> dict[str, str]:
    texts = await asyncio.gather(*(asyncio.to_thread(_scrape, u) for u in urls.values()))
    return dict(zip(urls, texts, strict=True))


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [(dict(s.labels), s.value) for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name]


async def test_every_service_passes_promtool_and_shows_wire_versions(
    tmp_path: Path, promtool: str
) -> None:
    async with running_stack(tmp_path) as stack:
        traffic = asyncio.create_task(generate_traffic(stack))
        # Each node reads its peers (never itself): the v1 node reads v2, the v2 nodes both.
        expected = {name: {str(v) for peer, v in NODES if peer != name} for name, _ in NODES}
        read: dict[str, set[str]] = {}
        try:
            async with asyncio.timeout(60):
                while True:
                    await asyncio.sleep(0.3)
                    texts = await _scrape_all(stack.metrics_urls())
                    read = {
                        name: {labels["wire_version"] for labels, value in
                               _samples(texts[name], "worknode_deltas_applied_total") if value}
                        for name, _ in NODES
                    }
                    if read == expected:
                        break
        except TimeoutError:
            raise AssertionError(f"wire versions read {read}, expected {expected}") from None
        finally:
            traffic.cancel()
            await asyncio.gather(traffic, return_exceptions=True)

    for name, text in texts.items():
        lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                              text=True, timeout=30, check=False)
        report = f"promtool check metrics on {name}:\n{lint.stdout}{lint.stderr}"
        assert lint.returncode == 0, report
        assert lint.stdout + lint.stderr == "", report
        names = {f.name for f in text_string_to_metric_families(text)}
        # Ours, and prometheus-client's process collector (RSS, CPU, fds).
        assert all(n.startswith(("worknode_", "process_")) for n in names), names
        assert {"process_resident_memory_bytes", "process_cpu_seconds",
                "process_open_fds"} <= names, names
        assert not any(n.endswith("_created") for n in names), names

    for name, version in NODES:
        (labels, value), = _samples(texts[name], "worknode_build_info")
        assert value == 1
        assert labels["service"] == "worknode"
        assert labels["wire_version"] == str(version)
        assert labels["peer_wire_version"] == "1"
        assert labels["newest_wire_version"] == str(CURRENT_VERSION)
    (labels, _), = _samples(texts["healer"], "worknode_build_info")
    assert labels["service"] == "healer"
