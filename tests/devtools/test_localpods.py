"""The pieces of the kubelet stand-in and of the pod network that need no cluster."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from slm_devtools.cluster import PodNetwork, claim_pod_network
from slm_devtools.localpods import LocalContainer, atomic_write_dir, pod_log_path


def test_a_volume_is_written_as_the_kubelet_writes_it(tmp_path: Path) -> None:
    """Names are links into `..data`, which one rename switches: a reader sees the old or the new set."""
    volume = tmp_path / "config"
    assert atomic_write_dir(volume, {"a.yaml": b"one", "b.yaml": b"two"})
    first = os.readlink(volume / "..data")
    assert os.readlink(volume / "a.yaml") == "..data/a.yaml" and (volume / "b.yaml").read_bytes() == b"two"

    assert not atomic_write_dir(volume, {"a.yaml": b"one", "b.yaml": b"two"})  # unchanged: nothing written
    assert os.readlink(volume / "..data") == first

    assert atomic_write_dir(volume, {"a.yaml": b"three"})
    assert os.readlink(volume / "..data") != first
    assert (volume / "a.yaml").read_bytes() == b"three" and not (volume / "b.yaml").exists()
    hidden = {p.name for p in volume.iterdir() if p.name.startswith("..")}
    assert hidden == {"..data", os.readlink(volume / "..data")}  # the previous content is gone


def test_a_pod_ip_has_a_local_twin_and_only_its_own_cluster_s_pods_do() -> None:
    network = PodNetwork(161)
    assert network.node_cidr(0) == "10.161.0.0/20" and network.node_cidr(2) == "10.161.32.0/20"
    assert network.local_address("10.161.0.3") == "127.161.0.3"
    assert network.local_address("10.161.33.200") == "127.161.33.200"
    with pytest.raises(ValueError, match=r"10\.162\.0\.3 is not a pod address of this cluster \(10\.161\.0\.0/16\)"):
        network.local_address("10.162.0.3")


def test_two_clusters_on_one_machine_never_share_a_pod_network(tmp_path: Path) -> None:
    first, first_claim = claim_pod_network(tmp_path)
    second, _ = claim_pod_network(tmp_path)
    assert first.octet != second.octet
    assert first_claim.read_text() == str(os.getpid())


def test_a_claim_whose_process_is_gone_is_taken_over(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    for octet in range(100, 250):
        (tmp_path / f"podnet-{octet}").write_text(gone)
    network, claim = claim_pod_network(tmp_path)
    assert 100 <= network.octet < 250 and claim.read_text() == str(os.getpid())


PRINTS = """
import sys
print('{"level": "info", "message": "started"}', flush=True)
print("Traceback (most recent call last):", file=sys.stderr, flush=True)
print("x" * 20000, flush=True)
"""


def test_a_container_s_output_lands_in_the_node_s_log_file_as_the_runtime_writes_it(tmp_path: Path) -> None:
    """With a node log directory, each line goes to /var/log/pods/<ns>_<pod>_<uid>/<container>/<n>.log in the
    CRI format (stream, F or P for a line split at 16 KiB), and a restart starts the next file."""
    node_logs = tmp_path / "var" / "log" / "pods"
    cri_dir = pod_log_path(node_logs, "llm", "tiny-demo-7d9f8b6c5d-x2x4z", "0b6a", "server").parent
    container = LocalContainer("server", [sys.executable, "-c", PRINTS], {}, tmp_path / "server.log", cri_dir)
    container.start(tmp_path)
    assert container.process is not None and container.process.wait(30) == 0
    container.stop()

    path = node_logs / "llm_tiny-demo-7d9f8b6c5d-x2x4z_0b6a" / "server" / "0.log"
    assert container.cri_log == path
    records = [re.fullmatch(r"(\S+) (stdout|stderr) ([FP]) (.*)", line) for line in path.read_text().splitlines()]
    assert all(records), path.read_text()[:300]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", r[1]) for r in records if r)
    parts = [(r[2], r[3], r[4]) for r in records if r]
    assert ("stdout", "F", '{"level": "info", "message": "started"}') in parts
    assert ("stderr", "F", "Traceback (most recent call last):") in parts
    long_line = [(tag, len(text)) for stream, tag, text in parts if set(text) == {"x"}]
    assert long_line == [("P", 16 * 1024), ("F", 20000 - 16 * 1024)]
    # The plain log keeps the output as printed, too.
    assert "x" * 20000 in (tmp_path / "server.log").read_text()

    container.restarts += 1
    container.argv = [sys.executable, "-c", "print('again')"]
    container.start(tmp_path)
    assert container.process is not None and container.process.wait(30) == 0
    container.stop()
    assert (path.parent / "1.log").read_text().endswith(" stdout F again\n")
