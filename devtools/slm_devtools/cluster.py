"""A real Kubernetes control plane on loopback, from the pinned binaries (no Docker needed).

etcd + kube-apiserver (TLS with generated certificates, RBAC, PodSecurity admission) +
kube-controller-manager (garbage collector, deployment/replicaset/endpointslice controllers,
service-account tokens) + kube-scheduler + KWOK, which fakes GPU nodes (`nvidia.com/gpu` capacity and
the labels NVIDIA's GPU operator sets) so pods schedule and turn Running.

Pod addresses: each cluster claims a /16 of 10.0.0.0/8 (`PodNetwork`) and gives each fake node a
slice of it as `spec.podCIDR`, from which KWOK hands out pod IPs. A pod IP 10.A.B.C has a local twin
127.A.B.C (all of 127.0.0.0/8 is this machine's loopback), where slm_devtools.localpods runs the
pod's real processes. The pod IPs themselves cannot be loopback addresses: the API server refuses
them in Endpoints and EndpointSlices (`may not be in the loopback range`), so no Service would ever
list such a pod; Prometheus, which finds targets through those, reaches the twin through one
address rewrite (slm_devtools.promstack, "running outside a pod").

    with LocalCluster.start(workdir) as cluster:
        cluster.kubectl("get", "nodes")

`ExistingCluster` wraps a cluster someone else made (kind via `make kind-up`): KWOK runs locally
against it to add the same fake GPU nodes, so the same tests run there.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import functools
import ipaddress
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import tools

SERVICE_CIDR = "10.96.0.0/16"
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
# On a cluster with real nodes (kind), the fake nodes are tainted so that only pods that mean to run on a
# fake node (the tests' own, which carry FAKE_NODE_TOLERATION) land there, and nothing the tests create
# without it lands there either; on the local control plane every node is fake and none is tainted.
FAKE_NODE_TAINT: dict[str, str] = {"key": KWOK_NODE_ANNOTATION, "value": "fake", "effect": "NoSchedule"}
FAKE_NODE_TOLERATION: dict[str, str] = {"key": KWOK_NODE_ANNOTATION, "operator": "Equal", "value": "fake",
                                        "effect": "NoSchedule"}
# Every fake node carries this label; a test pod selects it so that it never lands on a real node either.
FAKE_NODE_SELECTOR: dict[str, str] = {"type": "kwok"}

# Fake nodes: two GPU nodes (labels as NVIDIA's GPU operator / GPU feature discovery sets them) and one
# CPU-only node, so "no node can satisfy the GPU request" is testable too.
FAKE_NODES: tuple[dict[str, Any], ...] = (
    {"name": "gpu-node-0", "gpus": 4, "product": "NVIDIA-H100-80GB-HBM3"},
    {"name": "gpu-node-1", "gpus": 4, "product": "NVIDIA-L4"},
    {"name": "cpu-node-0", "gpus": 0, "product": None},
)


@dataclass(frozen=True)
class PodNetwork:
    """The pod addresses of one cluster: 10.<octet>.0.0/16, each fake node a /20 of it.

    `local_address(pod_ip)` is the loopback twin 127.<octet>.B.C where a pod's processes listen here.
    """

    octet: int

    @property
    def cidr(self) -> str:
        return f"10.{self.octet}.0.0/16"

    def node_cidr(self, index: int) -> str:
        return f"10.{self.octet}.{16 * index}.0/20"

    @property
    def node_ip(self) -> str:
        """What KWOK reports as the fake nodes' InternalIP (and hostNetwork pods' IP)."""
        return f"10.{self.octet}.255.254"

    @property
    def default_cidr(self) -> str:
        """KWOK's pool for a node without spec.podCIDR (a node made by someone else)."""
        return f"10.{self.octet}.240.0/21"

    def owns(self, ip: str) -> bool:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(self.cidr)

    def local_address(self, pod_ip: str) -> str:
        """Where the pod with `pod_ip` listens on this machine."""
        if not self.owns(pod_ip):
            raise ValueError(f"{pod_ip} is not a pod address of this cluster ({self.cidr})")
        return "127." + pod_ip.split(".", 1)[1]

    @property
    def address_regex(self) -> str:
        """An RE2 pattern of `<pod IP>:<port>` whose groups are the last three octets and the port."""
        return rf"10\.{self.octet}\.(\d+)\.(\d+):(\d+)"

    @property
    def local_replacement(self) -> str:
        return f"127.{self.octet}.${{1}}.${{2}}:${{3}}"


def claim_pod_network(registry: Path) -> tuple[PodNetwork, Path]:
    """A /16 no other running cluster on this machine uses (two would bind the same local addresses).

    A claim is a file named after the octet holding the owner's pid, made with O_EXCL; a claim whose
    owner is gone is taken over. Octets 100-249 keep clear of the service range (10.96.0.0/16).
    """
    registry.mkdir(parents=True, exist_ok=True)
    candidates = list(range(100, 250))
    random.shuffle(candidates)
    for octet in candidates:
        claim = registry / f"podnet-{octet}"
        for _ in range(2):
            try:
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if _claim_alive(claim):
                    break
                with contextlib.suppress(FileNotFoundError):
                    claim.unlink()
                continue
            with os.fdopen(fd, "w") as out:
                out.write(str(os.getpid()))
            return PodNetwork(octet), claim
    raise ClusterStartError(f"every pod network in {registry} is claimed by a running process; remove stale claims")


def _claim_alive(claim: Path) -> bool:
    try:
        pid = int(claim.read_text().strip() or "0")
    except (OSError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError as error:
        return error.errno == errno.EPERM
    return True


class KubectlError(subprocess.CalledProcessError):
    """kubectl failed; the message carries what it printed on stderr."""

    def __str__(self) -> str:
        return f"kubectl {' '.join(self.cmd[2:])} exited {self.returncode}: {str(self.stderr).strip()}"


class ClusterStartError(RuntimeError):
    """A component did not start: the message names it and carries its log's tail."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    what: str, check: Callable[[], bool], *, timeout: float, interval: float = 0.2,
    on_timeout: Callable[[], str] | None = None,
) -> None:
    """Poll `check` until it returns True or the deadline passes (then raise with a useful message)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except ClusterStartError:
            raise  # a component died: waiting longer cannot help
        except Exception as exc:  # the thing may not be up yet
            last_error = exc
        time.sleep(interval)
    detail = on_timeout() if on_timeout else ""
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}"
                       + (f" (last error: {last_error})" if last_error else "") + (f"\n{detail}" if detail else ""))


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Component:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    argv: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    def alive(self) -> bool:
        return self.process.poll() is None

    def failure(self) -> str:
        return f"{self.name} exited with code {self.process.returncode}; last lines of {self.log}:\n{tail(self.log)}"

    def stop(self, grace: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    def restart(self, grace: float = 10.0) -> None:
        """Stop the process and start it again with the same command line (same ports, same data)."""
        self.stop(grace)
        self.process = _popen(self.argv, self.log, self.env)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """SIGSTOP the process for the duration of the block, SIGCONT after (a hung, not a dead, process)."""
        os.kill(self.process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.process.pid, signal.SIGCONT)


def _popen(argv: Sequence[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, **env},
        )


def spawn(name: str, argv: Sequence[str], logdir: Path, env: dict[str, str] | None = None) -> Component:
    """Start a component in its own process group (so stop() also ends anything it forked)."""
    log = logdir / f"{name}.log"
    return Component(name, _popen(argv, log, env or {}), log, tuple(argv), dict(env or {}))


class Pki:
    """Certificates made with the openssl CLI: a CA, the API server's serving cert, client certs."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca_key, self.ca_crt = self.dir / "ca.key", self.dir / "ca.crt"
        self._openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", self.ca_key,
                      "-out", self.ca_crt, "-days", "2", "-subj", "/CN=slm-monitoring-test-ca")
        self.sa_key, self.sa_pub = self.dir / "sa.key", self.dir / "sa.pub"
        self._openssl("genrsa", "-out", self.sa_key, "2048")
        self._openssl("rsa", "-in", self.sa_key, "-pubout", "-out", self.sa_pub)

    @staticmethod
    def _openssl(*args: object) -> None:
        result = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ClusterStartError(f"openssl {args[0]} failed: {result.stderr.strip()}")

    def issue(
        self, name: str, subject: str, *, server_names: Sequence[str] = (), ips: Sequence[str] = ()
    ) -> tuple[Path, Path]:
        """A key and certificate signed by the CA, for a client (subject CN/O) or a server (SANs)."""
        key, csr, crt, ext = (self.dir / f"{name}.{s}" for s in ("key", "csr", "crt", "ext"))
        self._openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", subject)
        usage = "serverAuth" if server_names or ips else "clientAuth"
        lines = ["basicConstraints=CA:FALSE", "keyUsage=digitalSignature,keyEncipherment", f"extendedKeyUsage={usage}"]
        sans = [f"DNS:{n}" for n in server_names] + [f"IP:{i}" for i in ips]
        if sans:
            lines.append("subjectAltName=" + ",".join(sans))
        ext.write_text("\n".join(lines) + "\n")
        self._openssl("x509", "-req", "-in", csr, "-CA", self.ca_crt, "-CAkey", self.ca_key, "-CAcreateserial",
                      "-out", crt, "-days", "2", "-extfile", ext)
        return key, crt


def write_kubeconfig(path: Path, *, server: str, ca: Path, user: str, cert: Path | None = None,
                     key: Path | None = None, token: str | None = None, namespace: str = "default") -> Path:
    creds: dict[str, Any] = {"token": token} if token else {"client-certificate": str(cert), "client-key": str(key)}
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "slm",
        "clusters": [{"name": "slm", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": creds}],
        "contexts": [{"name": "slm", "context": {"cluster": "slm", "user": user, "namespace": namespace}}],
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


@dataclass
class ClusterBase:
    """What tests use, whoever made the cluster."""

    kubeconfig: Path
    workdir: Path
    components: list[Component] = field(default_factory=list)
    boot_seconds: float = 0.0
    pod_network: PodNetwork = field(default_factory=lambda: PodNetwork(0))
    _network_claim: Path | None = None

    def claim_pod_network(self) -> None:
        self.pod_network, self._network_claim = claim_pod_network(tools.cache_dir() / "run")

    def release_pod_network(self) -> None:
        if self._network_claim is not None:
            with contextlib.suppress(FileNotFoundError):
                self._network_claim.unlink()
            self._network_claim = None

    # --- kubectl and clients -------------------------------------------------------------------
    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                kubeconfig: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        argv = [tools.tool("kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def kubectl_json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def api_client(self, kubeconfig: Path | None = None) -> Any:
        from kubernetes import config as kconfig  # imported lazily: the harness is also used without it

        return kconfig.new_client_from_config(config_file=str(kubeconfig or self.kubeconfig))

    @property
    def server(self) -> str:
        return str(yaml.safe_load(self.kubeconfig.read_text())["clusters"][0]["cluster"]["server"])

    # --- namespaces and identities --------------------------------------------------------------
    def new_namespace(self, prefix: str = "test", *, restricted: bool = True) -> str:
        """A fresh namespace; `restricted` labels it for the restricted Pod Security Standard (enforced)."""
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        labels = {}
        if restricted:
            labels = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn", "audit")}
        manifest = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}
        self.kubectl("apply", "-f", "-", input=json.dumps(manifest))
        return name

    def kubeconfig_for_user(self, user: str, groups: Sequence[str] = ()) -> Path:
        """A kubeconfig for a test user (subject to RBAC like anyone else).

        On the local control plane: a client certificate signed by the cluster's CA. On a cluster made
        elsewhere there is no CA key here, so the user is a ServiceAccount of that name instead.
        """
        raise NotImplementedError

    def rbac_subject_for_user(self, user: str) -> dict[str, str]:
        """The RBAC subject that kubeconfig_for_user(user) authenticates as."""
        return {"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}

    def kubeconfig_for_service_account(self, namespace: str, name: str, *, hours: int = 2) -> Path:
        """A kubeconfig that authenticates as a ServiceAccount (token from the TokenRequest API)."""
        token = self.kubectl("create", "token", name, "-n", namespace, f"--duration={hours}h").stdout.strip()
        cluster = yaml.safe_load(self.kubeconfig.read_text())["clusters"][0]["cluster"]
        path = self.workdir / f"kubeconfig-sa-{namespace}-{name}"
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "sa",
            "clusters": [{"name": "c", "cluster": cluster}],
            "users": [{"name": f"{namespace}:{name}", "user": {"token": token}}],
            "contexts": [{"name": "sa", "context": {"cluster": "c", "user": f"{namespace}:{name}",
                                                    "namespace": namespace}}],
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    # --- Prometheus Operator CRDs ---------------------------------------------------------------
    def apply_crds(self, files: Sequence[Path], timeout: float = 60) -> list[str]:
        """Apply CRDs (server-side: some are too big for client-side apply), wait until each is served.

        Polls the Established condition rather than `kubectl wait`, which fails outright ("status.conditions
        accessor error") when it reads a CRD before the API server has written any condition.
        """
        args = ["apply", "--server-side", "--force-conflicts"]
        for f in files:
            args += ["-f", str(f)]
        self.kubectl(*args)
        names = [_crd_name(f) for f in files]

        def established() -> bool:
            items = self.kubectl_json("get", "crd", *names)
            items = items.get("items", [items])
            return len(items) == len(names) and all(
                any(c["type"] == "Established" and c["status"] == "True" for c in
                    (crd.get("status", {}).get("conditions") or [])) for crd in items)

        wait_for(f"CRDs {names} to be established", established, timeout=timeout)
        return names

    def install_prometheus_operator_crds(self, timeout: float = 60) -> list[str]:
        """The pinned Prometheus Operator release's CRDs, as kube-prometheus-stack installs them."""
        return self.apply_crds(sorted(tools.crd_dir_prometheus_operator().glob("*.yaml")), timeout)

    def uninstall_prometheus_operator_crds(self, timeout: float = 60) -> None:
        names = [_crd_name(f) for f in sorted(tools.crd_dir_prometheus_operator().glob("*.yaml"))]
        self.kubectl("delete", "--ignore-not-found", "--wait=true", f"--timeout={int(timeout)}s",
                     *[f"crd/{n}" for n in names])

    # --- fake GPU nodes -------------------------------------------------------------------------
    def create_fake_nodes(self, nodes: Sequence[dict[str, Any]] = FAKE_NODES, *, tainted: bool = False) -> None:
        """KWOK nodes; `tainted` adds FAKE_NODE_TAINT (a cluster with real nodes: kind)."""
        for index, spec in enumerate(nodes):
            manifest = fake_node_manifest(**spec, pod_cidr=self.pod_network.node_cidr(index), tainted=tainted)
            self.kubectl("apply", "-f", "-", input=json.dumps(manifest))

    def wait_nodes_ready(self, names: Sequence[str], timeout: float = 60) -> None:
        def ready() -> bool:
            self.check_components()
            items = self.kubectl_json("get", "nodes")["items"]
            ready_names = {
                n["metadata"]["name"] for n in items
                if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))
            }
            return set(names) <= ready_names

        wait_for(f"fake nodes {list(names)} to be Ready (KWOK)", ready, timeout=timeout, interval=0.5,
                 on_timeout=self._component_logs)

    def check_components(self) -> None:
        """Raise ClusterStartError naming the first component that has exited."""
        for component in self.components:
            if not component.alive():
                raise ClusterStartError(component.failure())

    def _component_logs(self) -> str:
        return "\n".join(f"--- {c.name} ({'running' if c.alive() else 'exited'}): {c.log}\n{tail(c.log, 15)}"
                         for c in self.components)

    def stop(self) -> None:
        for component in reversed(self.components):
            component.stop()
        self.components.clear()


def fake_node_manifest(name: str, gpus: int, product: str | None, pod_cidr: str | None = None,
                       tainted: bool = False) -> dict[str, Any]:
    labels = {
        "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
        "type": "kwok", "node.kubernetes.io/instance-type": "fake-gpu" if gpus else "fake-cpu",
    }
    capacity: dict[str, str] = {"cpu": "32", "memory": "256Gi", "pods": "110", "ephemeral-storage": "500Gi"}
    if gpus:
        labels.update({"nvidia.com/gpu.present": "true", "nvidia.com/gpu.count": str(gpus),
                       "nvidia.com/gpu.product": product or "NVIDIA-GPU"})
        capacity["nvidia.com/gpu"] = str(gpus)
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": {KWOK_NODE_ANNOTATION: "fake",
                                                                     "node.alpha.kubernetes.io/ttl": "0"}},
        # KWOK hands out this node's pod IPs from its podCIDR (see PodNetwork).
        "spec": {**({"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]} if pod_cidr else {}),
                 **({"taints": [dict(FAKE_NODE_TAINT)]} if tainted else {})},
        "status": {"capacity": capacity, "allocatable": capacity,
                   "nodeInfo": {"kubeletVersion": "fake", "architecture": "amd64", "operatingSystem": "linux"}},
    }


def start_kwok(cluster: ClusterBase, logdir: Path) -> Component:
    """KWOK managing only the nodes we annotate (never a real cluster's own nodes)."""
    kwok = spawn("kwok", [
        tools.tool("kwok"), f"--kubeconfig={cluster.kubeconfig}", f"--config={tools.tool('kwok-stages.yaml')}",
        f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
        f"--cidr={cluster.pod_network.default_cidr}", f"--node-ip={cluster.pod_network.node_ip}",
        f"--server-address=127.0.0.1:{free_port()}",
    ], logdir)
    cluster.components.append(kwok)
    return kwok


class LocalCluster(ClusterBase):
    """The control plane from the pinned binaries, all on 127.0.0.1, data in `workdir`."""

    pki: Pki
    etcd_url: str

    @classmethod
    @contextlib.contextmanager
    def start(cls, workdir: Path | None = None, *, timeout: float = 90, keep: bool = False) -> Iterator[LocalCluster]:
        owned = workdir is None
        workdir = Path(tempfile.mkdtemp(prefix="slm-cluster-")) if workdir is None else workdir
        cluster = cls(kubeconfig=workdir / "kubeconfig", workdir=workdir)
        cluster.claim_pod_network()
        try:
            cluster._boot(timeout)
            yield cluster
        finally:
            cluster.stop()
            cluster.release_pod_network()
            if owned and not keep:
                shutil.rmtree(workdir, ignore_errors=True)

    def _boot(self, timeout: float) -> None:
        started = time.monotonic()
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        pki = self.pki = Pki(self.workdir / "pki")
        # --- etcd ---
        etcd_port, peer_port = free_port(), free_port()
        etcd_url = self.etcd_url = f"http://127.0.0.1:{etcd_port}"
        self.components.append(spawn("etcd", [
            tools.tool("etcd"), f"--data-dir={self.workdir / 'etcd'}", "--name=slm",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster=slm=http://127.0.0.1:{peer_port}",
            "--unsafe-no-fsync",  # test data only: fsync dominates on shared CI disks
            "--quota-backend-bytes=2147483648", "--log-level=warn",
        ], logs))
        self._wait_healthy(self.components[-1], lambda: _http_ok(f"{etcd_url}/health"), timeout)

        # --- kube-apiserver ---
        api_port = free_port()
        server = f"https://127.0.0.1:{api_port}"
        serving_key, serving_crt = pki.issue(
            "apiserver", "/CN=kube-apiserver",
            server_names=["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                          "kubernetes.default.svc.cluster.local"],
            ips=["127.0.0.1", "10.96.0.1"])
        admin_key, admin_crt = pki.issue("admin", "/O=system:masters/CN=slm-admin")
        write_kubeconfig(self.kubeconfig, server=server, ca=pki.ca_crt, user="admin", cert=admin_crt, key=admin_key)
        self.components.append(spawn("kube-apiserver", [
            tools.tool("kube-apiserver"), f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={api_port}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={serving_crt}", f"--tls-private-key-file={serving_key}",
            f"--client-ca-file={pki.ca_crt}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki.sa_pub}", f"--service-account-signing-key-file={pki.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC", "--allow-privileged=true",
            "--enable-admission-plugins=NodeRestriction",  # plus the default set, PodSecurity included
            "--profiling=false", "--v=1",
        ], logs))
        self._wait_healthy(self.components[-1], lambda: self._api_ok("/readyz"), timeout)

        # --- controllers and scheduler, each with its own identity (RBAC bootstrap roles) ---
        cm = self._start_controller(pki, server, logs, "kube-controller-manager", [
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki.sa_key}", f"--root-ca-file={pki.ca_crt}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # Faster convergence for tests; production-like otherwise.
            "--concurrent-deployment-syncs=10", "--concurrent-replicaset-syncs=10", "--concurrent-gc-syncs=30",
        ])
        scheduler = self._start_controller(pki, server, logs, "kube-scheduler", [])
        for component, port in (cm, scheduler):
            healthz = f"https://127.0.0.1:{port}/healthz"
            self._wait_healthy(component, functools.partial(_https_ok, healthz), timeout)

        # --- KWOK and the fake GPU nodes ---
        start_kwok(self, logs)
        self.create_fake_nodes()
        self.wait_nodes_ready([n["name"] for n in FAKE_NODES], timeout=timeout)
        # The default ServiceAccount appears when the service-account controller has run.
        wait_for("the default ServiceAccount", lambda: self.kubectl(
            "get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0,
            timeout=timeout, on_timeout=self._component_logs)
        self.boot_seconds = time.monotonic() - started

    def kubeconfig_for_user(self, user: str, groups: Sequence[str] = ()) -> Path:
        subject = "".join(f"/O={group}" for group in groups) + f"/CN={user}"
        key, crt = self.pki.issue(f"user-{user}", subject)
        return write_kubeconfig(self.workdir / f"kubeconfig-user-{user}", server=self.server, ca=self.pki.ca_crt,
                                user=user, cert=crt, key=key)

    # --- faults of the platform (tests/e2e/test_platform_faults.py) -------------------------------
    def component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)

    def restart_apiserver(self, timeout: float = 90) -> None:
        """Stop kube-apiserver (SIGTERM, as a rolling control-plane upgrade does) and start it again on the
        same port with the same etcd: every client connection and watch is cut, the watch cache is rebuilt."""
        apiserver = self.component("kube-apiserver")
        apiserver.restart()
        self._wait_healthy(apiserver, lambda: self._api_ok("/readyz"), timeout)

    @contextlib.contextmanager
    def etcd_paused(self) -> Iterator[None]:
        """etcd frozen (SIGSTOP) for the block: the API server's storage hangs rather than fails."""
        with self.component("etcd").paused():
            yield

    def etcd_revision(self) -> int:
        """etcd's current revision (the newest resourceVersion), through its JSON gateway."""
        key = base64.b64encode(b"/registry/").decode()
        reply = _post_json(f"{self.etcd_url}/v3/kv/range", {"key": key, "limit": 1, "keys_only": True})
        return int(reply["header"]["revision"])

    def compact_etcd(self) -> int:
        """Compact etcd's history up to now (as the API server does every 5 minutes): a watch that resumes
        from an older resourceVersion is answered 410 Gone. Returns the revision compacted at."""
        revision = self.etcd_revision()
        _post_json(f"{self.etcd_url}/v3/kv/compaction", {"revision": revision, "physical": True})
        return revision

    def _start_controller(self, pki: Pki, server: str, logs: Path, name: str,
                          extra: list[str]) -> tuple[Component, int]:
        """kube-controller-manager or kube-scheduler, authenticated as system:<name> (bootstrap RBAC)."""
        key, crt = pki.issue(name, f"/CN=system:{name}")
        config = write_kubeconfig(self.workdir / f"kubeconfig-{name}", server=server, ca=pki.ca_crt,
                                  user=name, cert=crt, key=key)
        port = free_port()
        component = spawn(name, [
            tools.tool(name), f"--kubeconfig={config}",
            f"--authentication-kubeconfig={config}", f"--authorization-kubeconfig={config}",
            "--bind-address=127.0.0.1", f"--secure-port={port}", f"--cert-dir={self.workdir / (name + '-certs')}",
            "--leader-elect=false", "--v=1", *extra,
        ], logs)
        self.components.append(component)
        return component, port

    def _wait_healthy(self, component: Component, check: Callable[[], bool], timeout: float) -> None:
        def healthy() -> bool:
            if not component.alive():
                raise ClusterStartError(component.failure())
            return check()

        try:
            wait_for(f"{component.name} to become healthy", healthy, timeout=timeout)
        except ClusterStartError:
            self.stop()
            raise
        except TimeoutError as exc:
            self.stop()
            raise ClusterStartError(
                f"{component.name} did not become healthy within {timeout:.0f}s (port clash? another instance?). "
                f"Last lines of {component.log}:\n{tail(component.log)}") from exc

    def _api_ok(self, path: str) -> bool:
        config = yaml.safe_load(self.kubeconfig.read_text())
        user = config["users"][0]["user"]
        context = ssl.create_default_context(cafile=config["clusters"][0]["cluster"]["certificate-authority"])
        context.load_cert_chain(user["client-certificate"], user["client-key"])
        with urllib.request.urlopen(self.server + path, context=context, timeout=5) as response:  # noqa: S310
            return bool(response.status == 200)


class ExistingCluster(ClusterBase):
    """A cluster made elsewhere (kind, via `make kind-up`), named explicitly — never the ambient KUBECONFIG."""

    def kubeconfig_for_user(self, user: str, groups: Sequence[str] = ()) -> Path:
        if groups:
            raise ValueError("groups need the cluster's CA key; on an existing cluster bind roles to the user")
        self.kubectl("create", "serviceaccount", user, "-n", "default", check=False)
        return self.kubeconfig_for_service_account("default", user)

    def rbac_subject_for_user(self, user: str) -> dict[str, str]:
        return {"kind": "ServiceAccount", "name": user, "namespace": "default"}

    @classmethod
    @contextlib.contextmanager
    def attach(cls, kubeconfig: Path, *, timeout: float = 90) -> Iterator[ExistingCluster]:
        workdir = Path(tempfile.mkdtemp(prefix="slm-existing-"))
        cluster = cls(kubeconfig=kubeconfig, workdir=workdir)
        cluster.claim_pod_network()
        try:
            cluster.kubectl("version")  # fails clearly if unreachable
            start_kwok(cluster, workdir)
            cluster.create_fake_nodes(tainted=True)  # kind's own node is real: keep test pods off it
            cluster.wait_nodes_ready([n["name"] for n in FAKE_NODES], timeout=timeout)
            yield cluster
        finally:
            names = [n["name"] for n in FAKE_NODES]
            cluster.kubectl("delete", "node", "--ignore-not-found", *names, check=False)
            cluster.stop()
            cluster.release_pod_network()
            shutil.rmtree(workdir, ignore_errors=True)


def _crd_name(path: Path) -> str:
    # BaseLoader: upstream CRDs contain a bare `=` (an enum value) that PyYAML's safe loader rejects.
    return str(yaml.load(path.read_text(), Loader=yaml.BaseLoader)["metadata"]["name"])  # noqa: S506


def _post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",  # noqa: S310
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback URL we built
        return dict(json.loads(response.read()))


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback URL we built
        return bool(response.status == 200)


def _https_ok(url: str) -> bool:
    # Self-signed serving certs of the controller-manager/scheduler: only liveness is checked here.
    context = ssl._create_unverified_context()  # noqa: S323
    with urllib.request.urlopen(url, context=context, timeout=2) as response:  # noqa: S310
        return bool(response.status == 200)
