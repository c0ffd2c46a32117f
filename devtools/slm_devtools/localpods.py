"""The containers of a (KWOK-faked) pod run as local processes: a stand-in for the kubelet.

KWOK makes pods Running without running anything. For the pods whose processes the tests need (the
SLM server, the Prometheus and Alertmanager the Prometheus Operator generated), `LocalKubelet` does
what a kubelet would, with the pod object from the API server as the only input:

- **network**: the pod's IP 10.A.B.C has a local twin 127.A.B.C (cluster.PodNetwork). A process that
  would listen on all addresses of its pod (`0.0.0.0`, `:9090`, `--host 0.0.0.0`) listens on the twin;
  `localhost` in an argument or in a URL of the environment means the pod itself, so it becomes the twin too
  (the monitoring sidecar reaches its runtime at http://127.0.0.1:<port>, the pod's loopback).
- **volumes**: emptyDir, Secret, ConfigMap, projected (Secrets, ConfigMaps, the ServiceAccount token,
  downward API) and PersistentVolumeClaim (a local directory per claim) become directories under the
  pod's work directory, written as the kubelet writes them (files are links into a `..data` directory
  swapped atomically, so a watcher sees one consistent change). Secrets and ConfigMaps are watched
  and re-projected when they change, as the kubelet does (it may take up to a minute in a cluster;
  here it takes a watch event).
- **containers**: each container name maps to a local program (`RUNTIMES`, plus the `programs` a
  LocalKubelet is given, e.g. the stand-ins of slm_devtools.standin); its args and env are
  the pod's, with mount paths replaced by the local directories and `$(VAR)` expanded. Init
  containers run to completion first. Readiness is the container's own readinessProbe (httpGet).
- **logs**: a container's output goes to `<pod dir>/logs/<container>.log`; given a node's log directory
  (`LocalKubelet(pod_logs_dir=…)`, the node's `/var/log/pods`), it is also written there as the
  container runtime writes it for the kubelet: `<namespace>_<pod>_<uid>/<container>/<restarts>.log`
  in the CRI format (`cri_lines`), which is what a log collector on the node reads.

Nothing here changes what the pod asked for beyond those three translations; where one is needed
and missing (an unknown volume type or container), the pod fails to start with a message naming it.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cluster import ClusterBase, PodNetwork, tail
from .tools import tool

Adapter = Callable[[str, bytes], bytes]  # (file name, content) -> content actually written
# Adapters by volume name, or a function of the LocalPod giving them (they may need its paths).
Adapters = Mapping[str, Adapter] | Callable[["LocalPod"], Mapping[str, Adapter]]


class PodRunError(RuntimeError):
    """A pod cannot run here: the message names the pod and what is wrong."""


# ---- what runs for a container -----------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """How a container of a given name runs here: its program and the flags it listens with."""

    program: Callable[[], list[str]]
    # flag -> the port the program listens on when the flag is absent (it would bind all addresses).
    listen_flags: Mapping[str, int] = field(default_factory=dict)
    # Flags whose next argument is the address to listen on (`--host 0.0.0.0`): a pod's own address there
    # becomes the pod's twin.
    host_flags: tuple[str, ...] = ()


RUNTIMES: dict[str, Runtime] = {
    "prometheus": Runtime(lambda: [tool("prometheus")], {"--web.listen-address": 9090}),
    "alertmanager": Runtime(lambda: [tool("alertmanager")],
                            {"--web.listen-address": 9093, "--cluster.listen-address": 9094}),
    "config-reloader": Runtime(lambda: [tool("prometheus-config-reloader")], {"--listen-address": 8080}),
    "init-config-reloader": Runtime(lambda: [tool("prometheus-config-reloader")], {"--listen-address": 8081}),
    # The SLM server container the operator renders (`python -m slm_server`, the image's entry point).
    "server": Runtime(lambda: [sys.executable, "-m", "slm_server"]),
    # The monitoring sidecar in front of a third-party runtime (`python -m slm_sidecar`, its image's entry point).
    "slm-sidecar": Runtime(lambda: [sys.executable, "-m", "slm_sidecar"]),
    # llama.cpp's container: the real llama-server, built by `make deps` from the pinned sources (the image's
    # /app/llama-server; the container's `command` names that path, the args are the pod's).
    "llamacpp": Runtime(lambda: [tool("llama-server")], host_flags=("--host",)),
}

_OWN_HOSTS = ("0.0.0.0", "localhost", "127.0.0.1", "[::]", "::")  # noqa: S104 - a pod's own addresses


def _own_host(host: str) -> bool:
    return host in _OWN_HOSTS or host == ""


# ---- container logs as the runtime writes them ---------------------------------------------------------

# containerd (and CRI-O) split a line longer than this into partial (`P`) records.
CRI_MAX_LINE = 16 * 1024


def cri_time(at: float | None = None) -> str:
    """RFC 3339 with nanoseconds, UTC: the time field of a CRI log line."""
    at = time.time() if at is None else at
    seconds = int(at)
    nanos = round((at - seconds) * 1e9)
    if nanos >= 1_000_000_000:
        seconds, nanos = seconds + 1, nanos - 1_000_000_000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}Z"


def cri_lines(line: bytes, *, stream: str = "stdout", at: float | None = None) -> bytes:
    """One line of a container's output as the runtime writes it: split into `P` parts of at most
    16 KiB and a final `F` part, each `<time> <stream> <tag> <content>\\n`."""
    stamp = cri_time(at).encode()
    content = line.rstrip(b"\n")
    parts = [content[i:i + CRI_MAX_LINE] for i in range(0, len(content), CRI_MAX_LINE)] or [b""]
    out = bytearray()
    for index, part in enumerate(parts):
        tag = b"F" if index == len(parts) - 1 else b"P"
        out += stamp + b" " + stream.encode() + b" " + tag + b" " + part + b"\n"
    return bytes(out)


def pod_log_path(pod_logs_dir: Path, namespace: str, pod: str, uid: str, container: str, restarts: int = 0) -> Path:
    """Where the runtime writes a container's log on its node (the kubelet's layout)."""
    return pod_logs_dir / f"{namespace}_{pod}_{uid}" / container / f"{restarts}.log"


# ---- volumes ----------------------------------------------------------------------------------------


def atomic_write_dir(directory: Path, files: Mapping[str, bytes], mode: int = 0o644) -> bool:
    """Write `files` into `directory` the way the kubelet's AtomicWriter does; False when nothing changed.

    The content goes into a new hidden directory, `..data` is switched to it by one rename, and each
    name in `directory` is a link to `..data/<name>`: a reader never sees half an update.
    """
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "..data"
    if data.exists() and _read_tree(data) == dict(files):
        return False
    stamp = directory / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    stamp.mkdir()
    for name, content in files.items():
        target = stamp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        target.chmod(mode)
    link = directory / "..data_tmp"
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    link.symlink_to(stamp.name)
    os.replace(link, data)
    tops = {name.split("/", 1)[0] for name in files}
    for top in tops:
        entry = directory / top
        if not entry.is_symlink():
            entry.symlink_to(Path("..data") / top)
    for entry in directory.iterdir():
        if entry.name.startswith(".."):
            if entry.name not in ("..data", stamp.name):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink()
        elif entry.name not in tops:
            entry.unlink()
    return True


def _read_tree(root: Path) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for path in root.rglob("*"):
        if path.is_file():
            found[str(path.relative_to(root))] = path.read_bytes()
    return found


class NamespaceObjects:
    """Secrets and ConfigMaps of one namespace, kept current by watches (the kubelet's watch manager)."""

    def __init__(self, cluster: ClusterBase, namespace: str) -> None:
        self.namespace = namespace
        self._api = cluster.api_client()
        self._objects: dict[tuple[str, str], Any] = {}
        self._lock = threading.Condition()
        self._listeners: list[Callable[[str, str], None]] = []
        self._stop = threading.Event()
        self._synced: set[str] = set()
        self._threads = [threading.Thread(target=self._run, args=(kind,), daemon=True,
                                          name=f"watch-{kind}-{namespace}") for kind in ("Secret", "ConfigMap")]
        for thread in self._threads:
            thread.start()

    def listen(self, callback: Callable[[str, str], None]) -> None:
        with self._lock:
            self._listeners.append(callback)

    def get(self, kind: str, name: str, *, timeout: float = 0) -> Any:
        """The object, or None; with a timeout, waits that long for it to exist."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                if kind in self._synced and (found := self._objects.get((kind, name))) is not None:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return self._objects.get((kind, name))
                self._lock.wait(min(remaining, 0.5))

    def stop(self) -> None:
        self._stop.set()

    def _set(self, kind: str, name: str, obj: Any) -> None:
        with self._lock:
            old = self._objects.get((kind, name))
            if obj is None:
                self._objects.pop((kind, name), None)
            else:
                self._objects[(kind, name)] = obj
            changed = (old is None) != (obj is None) or (
                old is not None and obj is not None and old.metadata.resource_version != obj.metadata.resource_version)
            listeners = list(self._listeners)
            self._lock.notify_all()
        if changed:
            for callback in listeners:
                with contextlib.suppress(Exception):  # a listener's failure is its own; the watch goes on
                    callback(kind, name)

    def _run(self, kind: str) -> None:
        from kubernetes import client, watch

        core = client.CoreV1Api(self._api)
        lister = core.list_namespaced_secret if kind == "Secret" else core.list_namespaced_config_map
        while not self._stop.is_set():
            try:
                listing: Any = lister(self.namespace, _request_timeout=30)
                current: dict[str, Any] = {item.metadata.name: item for item in listing.items}
                with self._lock:
                    gone = [name for (k, name) in self._objects if k == kind and name not in current]
                for name in gone:
                    self._set(kind, name, None)
                for name, item in current.items():
                    self._set(kind, name, item)
                with self._lock:
                    self._synced.add(kind)
                    self._lock.notify_all()
                stream = watch.Watch()
                for event in stream.stream(lister, self.namespace, resource_version=listing.metadata.resource_version,
                                           timeout_seconds=10, _request_timeout=20):
                    if self._stop.is_set():
                        stream.stop()
                        break
                    if event["type"] == "ERROR":
                        break  # e.g. 410 Gone: list again
                    item = event["object"]
                    self._set(kind, item.metadata.name, None if event["type"] == "DELETED" else item)
            except Exception:  # the API server restarting, a timeout: list again shortly
                self._stop.wait(0.5)


def secret_files(secret: Any) -> dict[str, bytes]:
    return {key: base64.b64decode(value) for key, value in (secret.data or {}).items()}


def config_map_files(config_map: Any) -> dict[str, bytes]:
    files = {key: value.encode() for key, value in (config_map.data or {}).items()}
    files.update({key: base64.b64decode(value) for key, value in (config_map.binary_data or {}).items()})
    return files


def _select_items(files: dict[str, bytes], items: Sequence[Mapping[str, Any]] | None, what: str) -> dict[str, bytes]:
    if not items:
        return files
    chosen = {}
    for item in items:
        if item["key"] not in files:
            raise PodRunError(f"{what} has no key {item['key']!r}")
        chosen[item["path"]] = files[item["key"]]
    return chosen


# ---- one pod ---------------------------------------------------------------------------------------


@dataclass
class LocalContainer:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    # The node's log file of this container without its `<restarts>.log` (see `pod_log_path`); None: only `log`.
    cri_dir: Path | None = None
    restarts: int = 0
    process: subprocess.Popen[bytes] | None = None
    _copiers: list[threading.Thread] = field(default_factory=list)
    _write_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def cri_log(self) -> Path | None:
        return None if self.cri_dir is None else self.cri_dir / f"{self.restarts}.log"

    def start(self, cwd: Path) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        if self.cri_dir is None:
            with self.log.open("ab") as out:
                self.process = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True)
            return
        self.cri_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True)
        self._copiers = [threading.Thread(target=self._copy, args=(stream, name), daemon=True,
                                          name=f"log-{self.name}-{name}")
                         for stream, name in ((self.process.stdout, "stdout"), (self.process.stderr, "stderr"))]
        for copier in self._copiers:
            copier.start()

    def _copy(self, stream: Any, stream_name: str) -> None:
        """Each line as it comes: to `log` as it is, to the node's log file as the runtime writes it."""
        cri_log = self.cri_log
        assert cri_log is not None
        for line in iter(stream.readline, b""):
            with self._write_lock, self.log.open("ab") as plain, cri_log.open("ab") as cri:
                plain.write(line)
                cri.write(cri_lines(line, stream=stream_name))

    def _join_copiers(self) -> None:
        for copier in self._copiers:
            copier.join(timeout=10)
        self._copiers = []

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = 10) -> None:
        if self.process is None or self.process.poll() is not None:
            self._join_copiers()
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, 15)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, 9)
            self.process.wait(5)
        self._join_copiers()

    def kill(self) -> None:
        if self.running():
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, 9)
            self.process.wait(5)
        self._join_copiers()


class LocalPod:
    """One pod's containers as local processes (see the module docstring for the translations)."""

    def __init__(self, kubelet: LocalKubelet, pod: dict[str, Any], *, adapters: Adapters | None = None,
                 env: Mapping[str, str] | None = None, seed: Mapping[str, Path] | None = None) -> None:
        self.kubelet = kubelet
        self.pod = pod
        self.namespace = pod["metadata"]["namespace"]
        self.name = pod["metadata"]["name"]
        self.uid = pod["metadata"]["uid"]
        self.ip = pod["status"]["podIP"]
        self.address = kubelet.network.local_address(self.ip)
        self.dir = kubelet.workdir / self.namespace / f"{self.name}-{self.uid[:8]}"
        self.adapters: dict[str, Adapter] = dict((adapters(self) if callable(adapters) else adapters) or {})
        self.extra_env = dict(env or {})
        self.seed = dict(seed or {})
        self.containers: list[LocalContainer] = []
        self._projected: dict[str, Mapping[str, Any]] = {}  # volume name -> volume
        self._token: bytes | None = None
        self._update_lock = threading.Lock()
        # (time.time(), volume name) of every projection that changed a volume, for timing what follows.
        self.projections: list[tuple[float, str]] = []

    def __repr__(self) -> str:
        return f"pod {self.namespace}/{self.name} ({self.ip} here at {self.address})"

    # --- addresses --------------------------------------------------------------------------------
    def port(self, name_or_number: str | int, container: str | None = None) -> int:
        if isinstance(name_or_number, int) or str(name_or_number).isdigit():
            return int(name_or_number)
        for spec in self.pod["spec"]["containers"]:
            if container and spec["name"] != container:
                continue
            for port in spec.get("ports") or []:
                if port.get("name") == name_or_number:
                    return int(port["containerPort"])
        raise PodRunError(f"{self!r} has no container port named {name_or_number!r}")

    def url(self, port: str | int, path: str = "") -> str:
        return f"http://{self.address}:{self.port(port)}{path}"

    # --- volumes ----------------------------------------------------------------------------------
    def volume_dir(self, name: str) -> Path:
        return self.dir / "volumes" / name

    def host_path(self, container: str, path: str) -> str:
        """A path as `container` sees it, on this machine (longest mount path first)."""
        spec = next(c for c in self._all_container_specs() if c["name"] == container)
        return self._map_paths(path, self._mounts(spec))

    def _mounts(self, container: Mapping[str, Any]) -> list[tuple[str, str]]:
        mounts = []
        for mount in container.get("volumeMounts") or []:
            local = self.volume_dir(mount["name"])
            if mount.get("subPath"):
                local = local / mount["subPath"]
            mounts.append((mount["mountPath"].rstrip("/") or "/", str(local)))
        return sorted(mounts, key=lambda m: len(m[0]), reverse=True)

    @staticmethod
    def _map_paths(value: str, mounts: Sequence[tuple[str, str]]) -> str:
        for mount_path, local in mounts:
            # A mount path at the start of the value or after `=` / `:` / `,` (flag values, lists).
            pattern = rf"(^|(?<=[=:,])){re.escape(mount_path)}(?=/|$|[,:])"
            if re.search(pattern, value):
                return re.sub(pattern, lambda _m, local=local: local, value)  # type: ignore[misc]
        return value

    def _project_all(self, *, wait: float) -> None:
        for volume in self.pod["spec"].get("volumes") or []:
            name = volume["name"]
            directory = self.volume_dir(name)
            if "emptyDir" in volume:
                directory.mkdir(parents=True, exist_ok=True)
                if name in self.seed:
                    shutil.copytree(self.seed[name], directory, dirs_exist_ok=True)
            elif "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                local = self.kubelet.claims.get(claim)
                if local is None:
                    raise PodRunError(f"{self!r}: volume {name!r} uses PersistentVolumeClaim {claim!r}, which has no "
                                      f"local directory (LocalKubelet claims: {sorted(self.kubelet.claims)})")
                directory.parent.mkdir(parents=True, exist_ok=True)
                if not directory.exists():
                    directory.symlink_to(local)
            elif any(k in volume for k in ("secret", "configMap", "projected", "downwardAPI")):
                self._projected[name] = volume
                self._project(volume, wait=wait)
            else:
                kinds = sorted(set(volume) - {"name"})
                raise PodRunError(f"{self!r}: volume {name!r} of type {kinds} cannot be made here")

    def _project(self, volume: Mapping[str, Any], *, wait: float = 0) -> bool:
        name = volume["name"]
        files: dict[str, bytes] = {}
        sources = (volume["projected"].get("sources") or []) if "projected" in volume else [volume]
        for source in sources:
            files.update(self._source_files(source, wait=wait))
        adapter = self.adapters.get(name)
        if adapter is not None:
            files = {key: adapter(key, content) for key, content in files.items()}
        changed = atomic_write_dir(self.volume_dir(name), files)
        if changed:
            self.projections.append((time.time(), name))
        return changed

    def _source_files(self, source: Mapping[str, Any], *, wait: float) -> dict[str, bytes]:
        objects = self.kubelet.objects(self.namespace)
        if "secret" in source:
            ref = source["secret"]
            secret_name = ref.get("secretName") or ref.get("name")
            secret = objects.get("Secret", secret_name, timeout=wait)
            if secret is None:
                if ref.get("optional"):
                    return {}
                raise PodRunError(f"{self!r}: Secret {self.namespace}/{secret_name} does not exist")
            return _select_items(secret_files(secret), ref.get("items"), f"Secret {secret_name}")
        if "configMap" in source:
            ref = source["configMap"]
            config_map = objects.get("ConfigMap", ref["name"], timeout=wait)
            if config_map is None:
                if ref.get("optional"):
                    return {}
                raise PodRunError(f"{self!r}: ConfigMap {self.namespace}/{ref['name']} does not exist")
            return _select_items(config_map_files(config_map), ref.get("items"), f"ConfigMap {ref['name']}")
        if "serviceAccountToken" in source:
            return {source["serviceAccountToken"]["path"]: self._service_account_token()}
        if "downwardAPI" in source:
            return {item["path"]: self._field(item["fieldRef"]["fieldPath"]).encode()
                    for item in source["downwardAPI"].get("items") or []}
        raise PodRunError(f"{self!r}: projected source {sorted(source)} cannot be made here")

    def _service_account_token(self) -> bytes:
        """A token of the pod's ServiceAccount bound to the pod, as the kubelet requests one.

        Requested for 24 h instead of renewed every hour as the kubelet does: no test runs that long.
        """
        if self._token is None:
            account = self.pod["spec"].get("serviceAccountName") or "default"
            self._token = self.kubelet.cluster.kubectl(
                "create", "token", account, "-n", self.namespace, "--duration=24h",
                "--bound-object-kind=Pod", f"--bound-object-name={self.name}", f"--bound-object-uid={self.uid}",
            ).stdout.strip().encode()
        return self._token

    def _field(self, path: str) -> str:
        metadata = self.pod["metadata"]
        values = {
            "metadata.name": self.name, "metadata.namespace": self.namespace, "metadata.uid": self.uid,
            "status.podIP": self.ip, "spec.nodeName": self.pod["spec"].get("nodeName", ""),
            "spec.serviceAccountName": self.pod["spec"].get("serviceAccountName", ""),
        }
        if path in values:
            return str(values[path])
        match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if match:
            return str((metadata.get(match[1]) or {}).get(match[2], ""))
        raise PodRunError(f"{self!r}: field {path!r} of the downward API is not provided here")

    def on_object_changed(self, kind: str, name: str) -> None:
        """Re-project every volume that reads the changed Secret/ConfigMap (the kubelet's volume sync)."""
        key = "secret" if kind == "Secret" else "configMap"
        with self._update_lock:
            for volume in self._projected.values():
                sources = (volume["projected"].get("sources") or []) if "projected" in volume else [volume]
                for source in sources:
                    ref = source.get(key)
                    if ref is not None and (ref.get("secretName") or ref.get("name")) == name:
                        with contextlib.suppress(PodRunError):  # deleted meanwhile: keep the last content
                            self._project(volume)
                        break

    # --- containers -------------------------------------------------------------------------------
    def _all_container_specs(self) -> list[dict[str, Any]]:
        return [*(self.pod["spec"].get("initContainers") or []), *self.pod["spec"]["containers"]]

    def _rewrite_network(self, value: str) -> str:
        """`localhost` / `127.0.0.1` / `0.0.0.0` mean the pod itself."""
        return re.sub(r"(?<=://)(localhost|127\.0\.0\.1|0\.0\.0\.0)(?=[:/]|$)", self.address, value)

    def _container(self, spec: Mapping[str, Any]) -> LocalContainer:
        name = spec["name"]
        programs = {**RUNTIMES, **self.kubelet.programs}
        runtime = programs.get(name)
        if runtime is None:
            raise PodRunError(f"{self!r}: no local program for container {name!r} (image {spec.get('image')}); "
                              f"known: {sorted(programs)}")
        mounts = self._mounts(spec)
        env: dict[str, str] = {}
        for item in spec.get("env") or []:
            if "value" in item:
                value = str(item["value"])
                value = self._rewrite_network(self._map_paths(value, mounts))
                env[item["name"]] = self.address if _own_host(value) and item["name"].endswith("_HOST") else value
            elif "fieldRef" in (item.get("valueFrom") or {}):
                env[item["name"]] = self._field(item["valueFrom"]["fieldRef"]["fieldPath"])
            elif {"secretKeyRef", "configMapKeyRef"} & set(item.get("valueFrom") or {}):
                source = item["valueFrom"]
                kind, ref = ("Secret", source["secretKeyRef"]) if "secretKeyRef" in source else (
                    "ConfigMap", source["configMapKeyRef"])
                obj = self.kubelet.objects(self.namespace).get(kind, ref["name"], timeout=30)
                files = {} if obj is None else secret_files(obj) if kind == "Secret" else config_map_files(obj)
                if ref["key"] in files:
                    env[item["name"]] = files[ref["key"]].decode()
                elif not ref.get("optional"):
                    raise PodRunError(f"{self!r}: env {item['name']} of container {name} reads {kind} "
                                      f"{self.namespace}/{ref['name']} key {ref['key']!r}, which does not exist")
            else:
                raise PodRunError(f"{self!r}: env {item['name']} of container {name} uses {item.get('valueFrom')}, "
                                  "which is not provided here")
        env.update(self.extra_env if name == "server" else {})

        def expand(text: str) -> str:
            return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), text)

        args: list[str] = []
        seen_listen: set[str] = set()
        for raw in [*(spec.get("args") or [])]:
            arg = expand(str(raw))
            flag, eq, value = arg.partition("=")
            if args and args[-1] in runtime.host_flags and _own_host(arg):
                arg = self.address
            elif eq and flag in runtime.listen_flags:
                seen_listen.add(flag)
                host, _, given_port = value.rpartition(":")
                if value and _own_host(host):
                    arg = f"{flag}={self.address}:{given_port}"
            elif eq:
                arg = f"{flag}={self._rewrite_network(self._map_paths(value, mounts))}"
            else:
                arg = self._map_paths(arg, mounts)
            args.append(arg)
        for flag, port in runtime.listen_flags.items():
            if flag not in seen_listen:
                args.append(f"{flag}={self.address}:{port}")
        logs_dir = self.kubelet.pod_logs_dir
        cri_dir = None if logs_dir is None else pod_log_path(logs_dir, self.namespace, self.name, self.uid, name).parent
        return LocalContainer(name, [*runtime.program(), *args], env, self.dir / "logs" / f"{name}.log", cri_dir)

    def start(self, *, timeout: float = 120) -> LocalPod:
        deadline = time.monotonic() + timeout
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self._project_all(wait=max(1.0, deadline - time.monotonic()))
            for spec in self.pod["spec"].get("initContainers") or []:
                init = self._container(spec)
                init.start(self.dir)
                assert init.process is not None
                try:
                    code = init.process.wait(max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    init.kill()
                    raise PodRunError(f"{self!r}: init container {init.name} did not finish; "
                                      f"{init.log}:\n{tail(init.log)}") from None
                if code != 0:
                    raise PodRunError(f"{self!r}: init container {init.name} exited {code}; "
                                      f"{init.log}:\n{tail(init.log)}")
            for spec in self.pod["spec"]["containers"]:
                container = self._container(spec)
                self.containers.append(container)
                container.start(self.dir)
            self.wait_ready(max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def restart_container(self, name: str) -> None:
        """Stop a container and start it again with the same command, as the kubelet restarts one."""
        container = next(c for c in self.containers if c.name == name)
        container.stop()
        container.restarts += 1  # the runtime starts a new log file, <restarts>.log
        container.start(self.dir)

    def check(self) -> None:
        for container in self.containers:
            if not container.running():
                code = container.process.returncode if container.process else None
                raise PodRunError(f"{self!r}: container {container.name} exited ({code}); "
                                  f"{container.log}:\n{tail(container.log)}")

    def ready(self) -> bool:
        self.check()
        for spec in self.pod["spec"]["containers"]:
            probe = (spec.get("readinessProbe") or {}).get("httpGet")
            if not probe:
                continue
            url = self.url(probe["port"], probe.get("path", "/"))
            try:
                with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - a local pod address
                    if not 200 <= response.status < 400:
                        return False
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False
        return True

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {c.log}\n{tail(c.log, 20)}" for c in self.containers)
                raise PodRunError(f"{self!r} not ready within {timeout:.0f}s\n{logs}")
            time.sleep(0.2)

    def logs(self, container: str) -> str:
        return (self.dir / "logs" / f"{container}.log").read_text(errors="replace")

    def stop(self) -> None:
        for container in reversed(self.containers):
            container.stop()


# ---- the kubelet stand-in ---------------------------------------------------------------------------


class LocalKubelet:
    """Runs chosen pods of a cluster as local processes and keeps their volumes current."""

    def __init__(self, cluster: ClusterBase, workdir: Path, *, claims: Mapping[str, Path] | None = None,
                 pod_logs_dir: Path | None = None, programs: Mapping[str, Runtime] | None = None) -> None:
        self.cluster = cluster
        # Programs for container names beyond RUNTIMES (or instead of them), e.g. slm_devtools.standin.STAND_INS.
        self.programs: dict[str, Runtime] = dict(programs or {})
        self.network: PodNetwork = cluster.pod_network
        self.workdir = workdir
        self.claims: dict[str, Path] = dict(claims or {})
        # The node's /var/log/pods: containers' output is also written there as the runtime does.
        self.pod_logs_dir = pod_logs_dir
        self.pods: list[LocalPod] = []
        self._objects: dict[str, NamespaceObjects] = {}
        self._lock = threading.Lock()

    def objects(self, namespace: str) -> NamespaceObjects:
        with self._lock:
            if namespace not in self._objects:
                watched = NamespaceObjects(self.cluster, namespace)
                watched.listen(functools.partial(self._changed, namespace))
                self._objects[namespace] = watched
            return self._objects[namespace]

    def _changed(self, namespace: str, kind: str, name: str) -> None:
        for pod in list(self.pods):
            if pod.namespace == namespace:
                pod.on_object_changed(kind, name)

    def running_pod(self, namespace: str, selector: str, *, timeout: float = 90) -> dict[str, Any]:
        """The one pod matching `selector`, once KWOK has made it Running with an IP."""
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            seen = self.cluster.kubectl_json("get", "pods", "-n", namespace, "-l", selector)["items"]
            live = [p for p in seen if not p["metadata"].get("deletionTimestamp")]
            running = [p for p in live if p["status"].get("phase") == "Running" and p["status"].get("podIP")]
            if len(running) == 1 and len(live) == 1:
                return running[0]
            time.sleep(0.3)
        states = [(p["metadata"]["name"], p["status"].get("phase"), p["status"].get("podIP")) for p in seen]
        raise PodRunError(f"no single Running pod with an IP matched {selector!r} in {namespace} within {timeout:.0f}s "
                          f"(pods: {states or 'none'})")

    def run(self, pod: dict[str, Any], *, adapters: Adapters | None = None,
            env: Mapping[str, str] | None = None, seed: Mapping[str, Path] | None = None,
            timeout: float = 120) -> LocalPod:
        local = LocalPod(self, pod, adapters=adapters, env=env, seed=seed)
        self.objects(local.namespace)  # watch its namespace before projecting
        with self._lock:
            self.pods.append(local)
        try:
            local.start(timeout=timeout)
        except BaseException:
            with self._lock:
                self.pods.remove(local)
            raise
        return local

    def stop_pod(self, pod: LocalPod) -> None:
        pod.stop()
        with self._lock:
            if pod in self.pods:
                self.pods.remove(pod)

    def stop(self) -> None:
        for pod in reversed(list(self.pods)):
            pod.stop()
        self.pods.clear()
        for watched in self._objects.values():
            watched.stop()
        self._objects.clear()

    @contextlib.contextmanager
    def running(self) -> Iterator[LocalKubelet]:
        try:
            yield self
        finally:
            self.stop()
