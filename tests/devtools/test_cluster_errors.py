"""When the control plane cannot start, the message names the component and says what happened.

These use stand-in executables in place of etcd (a shell script that fails the way etcd fails on a port
clash), because the point is the harness's error path, which a healthy etcd never takes."""

from __future__ import annotations

import pytest

from slm_devtools import tools
from slm_devtools.cluster import ClusterStartError, LocalCluster


def test_missing_binary_says_to_run_make_deps(tmp_path, monkeypatch):
    monkeypatch.setenv("SLM_BIN_DIR", str(tmp_path / "empty"))

    with pytest.raises(tools.ToolMissing, match=r"etcd not found .*run `make deps`"):
        tools.tool("etcd")


def test_component_that_dies_at_start_is_named_with_its_log_tail(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    etcd = bin_dir / "etcd"
    etcd.write_text("#!/bin/sh\necho 'listen tcp 127.0.0.1:2379: bind: address already in use' >&2\nexit 1\n")
    etcd.chmod(0o755)
    monkeypatch.setenv("SLM_BIN_DIR", str(bin_dir))

    with pytest.raises(ClusterStartError) as failure, LocalCluster.start(tmp_path / "cluster", timeout=20):
        pass

    message = str(failure.value)
    assert message.startswith("etcd exited with code 1")
    assert "address already in use" in message


def test_component_that_never_becomes_healthy_times_out_with_advice(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    etcd = bin_dir / "etcd"
    etcd.write_text("#!/bin/sh\necho 'starting, never listening'\nexec sleep 30\n")
    etcd.chmod(0o755)
    monkeypatch.setenv("SLM_BIN_DIR", str(bin_dir))

    with pytest.raises(ClusterStartError, match=r"etcd did not become healthy within 2s .*port clash") as failure, \
            LocalCluster.start(tmp_path / "cluster", timeout=2):
        pass

    assert "never listening" in str(failure.value)
