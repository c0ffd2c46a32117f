#!/usr/bin/env bash
# GPU check of the server (issue 4), for a machine with an NVIDIA GPU and no network:
#   1. builds the project's tiny model (CPU, ~1 min, cached) — nothing is downloaded;
#   2. runs the server on CUDA and checks it generates there (slm_model_info{device="cuda..."});
#   3. compares the server's pynvml series with `nvidia-smi` for every GPU;
#   4. measures generation tokens/s with monitoring on (the default server: metrics, JSON request
#      logs, drift detection) and off (SLM_METRICS_ENABLED=false, SLM_LOG_REQUESTS=false), same
#      load, same model;
#   5. measures tokens/s with continuous batching (the default) and with one generation at a time
#      (SLM_MAX_BATCH_SIZE=1), and the mean batch size from the server's own counters;
#   and on the way, the sampling paths, prefix caching and structured output on the device.
#   The two servers of each comparison run at once and take the load in turn, 3 rounds after a warm-up.
#
#   scripts/gpu-check.sh                       # uses .venv/bin/python, or $PYTHON, or python3
#   GPU_CHECK_BUNDLE=.gpu scripts/gpu-check.sh # a machine whose python3 has torch but not the
#                                              # server's web stack: see scripts/gpu-bundle.sh
#   GPU_CHECK_ALLOW_CPU=1 scripts/gpu-check.sh # rehearse the flow on a machine without a GPU
#   GPU_CHECK_REQUESTS=64                      # requests per tokens/s run
#   GPU_CHECK_ROUNDS=3                         # runs each way (odd: the median is one of them)
#
# Exit status 0 when every check passed. Output is plain text meant to be pasted into a note.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cd "$repo"
PYTHON="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
site=""
if [ -n "${GPU_CHECK_BUNDLE:-}" ]; then
  bundle="$(cd "$GPU_CHECK_BUNDLE" && pwd)"
  site="$(mktemp -d -t gpu-check-site-XXXXXX)"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$bundle"/wheels/*.whl
  export SLM_CACHE_DIR="$bundle/cache"  # the tiny model built by gpu-bundle.sh
fi
export PYTHONPATH="$repo/server${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

echo "== machine"
"$PYTHON" - <<'EOF'
import platform, sys
import torch
print(f"python {sys.version.split()[0]}  torch {torch.__version__}  cuda available: {torch.cuda.is_available()}")
for i in range(torch.cuda.device_count()):
    print(f"  cuda:{i} {torch.cuda.get_device_name(i)}")
EOF
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
elif [ -z "${GPU_CHECK_ALLOW_CPU:-}" ]; then
  echo "nvidia-smi not found: not a GPU machine (set GPU_CHECK_ALLOW_CPU=1 to rehearse on CPU)" >&2
  exit 2
fi

exec "$PYTHON" - "$@" <<'EOF'
"""The checks themselves (run by scripts/gpu-check.sh)."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from slm_devtools.tinymodel import ensure_tiny_model

ALLOW_CPU = bool(os.environ.get("GPU_CHECK_ALLOW_CPU"))
HAVE_SMI = shutil.which("nvidia-smi") is not None
failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  [{'ok' if ok else 'FAIL'}] {what}")
    if not ok:
        failures.append(what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, timeout: float = 120) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - loopback only
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@contextlib.contextmanager
def server(model_dir, log_dir, **env):
    port = free_port()
    log_path = os.path.join(log_dir, f"server-{port}.log")
    full_env = {**os.environ, "SLM_MODEL": str(model_dir), "SLM_SERVED_MODEL_NAME": "tiny", "SLM_HOST": "127.0.0.1",
                "SLM_PORT": str(port), "SLM_DEVICE": "cpu" if ALLOW_CPU and not HAVE_SMI else "cuda",
                "SLM_MAX_CONCURRENT_REQUESTS": "8", **env}
    with open(log_path, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "slm_server"], env=full_env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not become ready; its log:\n{open(log_path).read()[-4000:]}")
            try:
                if http("GET", f"{base}/readyz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def samples(base: str) -> list:
    text = http("GET", f"{base}/metrics")[1].decode()
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def smi() -> dict[str, dict[str, float]]:
    fields = "index,uuid,memory.total,memory.used,utilization.gpu,temperature.gpu,power.draw"
    out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    rows = {}
    for line in out.strip().splitlines():
        index, uuid, total, used, util, temp, power = (v.strip() for v in line.split(","))
        num = lambda v: float(v) if v not in ("[N/A]", "N/A", "[Not Supported]") else None  # noqa: E731
        rows[index] = {"uuid": uuid, "total": num(total) * 2**20, "used": num(used) * 2**20, "util": num(util),
                       "temp": num(temp), "power": num(power)}
    return rows


def load(base: str, requests: int, concurrency: int, max_tokens: int) -> tuple[float, int]:
    """Tokens/s of `requests` greedy generations of `max_tokens`, `concurrency` at a time."""
    tokens = 0
    lock = threading.Lock()
    queue = list(range(requests))

    def worker():
        nonlocal tokens
        while True:
            with lock:
                if not queue:
                    return
                i = queue.pop()
            status, body = http("POST", f"{base}/generate",
                                {"prompt": f"Return the number {i} of items in the list", "max_tokens": max_tokens,
                                 "temperature": 0})
            assert status == 200, body[:300]
            with lock:
                tokens += json.loads(body)["output_tokens"]

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tokens / (time.perf_counter() - start), tokens


model_dir = ensure_tiny_model(log=lambda m: print(f"  {m}"))
print(f"== tiny model: {model_dir}")
log_dir = tempfile.mkdtemp(prefix="gpu-check-")

print("== server on CUDA, pynvml vs nvidia-smi" if HAVE_SMI or not ALLOW_CPU else "== server (CPU rehearsal: no GPU here)")
with server(model_dir, log_dir) as base:
    status, body = http("POST", f"{base}/generate", {"prompt": "Return the", "max_tokens": 32, "temperature": 0})
    check(status == 200, f"POST /generate on the GPU server: {status}")
    got = samples(base)
    info = [s for s in got if s.name == "slm_model_info"]
    device = info[0].labels["device"] if info else "?"
    print(f"  slm_model_info: {info[0].labels if info else 'missing'}")
    if ALLOW_CPU and not HAVE_SMI:
        check(device == "cpu", f"model loaded (device={device}; a rehearsal on CPU)")
    else:
        check(device.startswith("cuda"), f"model on CUDA (device={device})")
    gpu = {}
    for s in got:
        if s.name.startswith("nvidia_gpu_"):
            gpu.setdefault(s.labels["index"], {})[s.name] = s.value
    if HAVE_SMI:
        reference = smi()
        check(set(gpu) == set(reference), f"one pynvml series set per GPU: {sorted(gpu)} vs nvidia-smi {sorted(reference)}")
        print(f"  {'gpu':<4} {'reading':<14} {'pynvml (server)':>18} {'nvidia-smi':>16}")
        for index, ref in sorted(reference.items()):
            mine = gpu.get(index, {})
            rows = [
                ("memory total", mine.get("nvidia_gpu_memory_total_bytes"), ref["total"], 2**20 + 1),
                ("memory used", mine.get("nvidia_gpu_memory_used_bytes"), ref["used"], max(0.05 * ref["used"], 256 * 2**20)),
                ("utilization %", mine.get("nvidia_gpu_utilization"), ref["util"], 100),  # instantaneous: shown, loosely checked
                ("temperature C", mine.get("nvidia_gpu_temperature_celsius"), ref["temp"], 5),
                ("power W", mine.get("nvidia_gpu_power_watts"), ref["power"], max(0.25 * (ref["power"] or 0), 30)),
            ]
            for name, a, b, tolerance in rows:
                print(f"  {index:<4} {name:<14} {a if a is not None else '-':>18} {b if b is not None else '-':>16}")
                if b is not None:
                    check(a is not None and abs(a - b) <= tolerance, f"gpu {index} {name} within {tolerance:g}")
    else:
        check(not gpu, "no GPU: no nvidia_gpu_* series")

    # The sampling paths on the device: a seeded generator, top_p's sort, top_k, the penalties' counts.
    sampled = {"prompt": "Return the", "max_tokens": 32, "temperature": 0.8, "top_p": 0.9, "top_k": 50, "seed": 7,
               "presence_penalty": 0.5, "frequency_penalty": 0.5}
    first, again = (http("POST", f"{base}/generate", sampled) for _ in range(2))
    ok = first[0] == again[0] == 200 and json.loads(first[1])["text"] == json.loads(again[1])["text"]
    check(ok, "a seeded top_p + top_k sample with penalties: 200, and the same text twice")
    status, body = http("POST", f"{base}/v1/chat/completions",
                        {"model": "tiny", "messages": [{"role": "user", "content": "Return the list"}],
                         "max_tokens": 16, "stream": True})
    frames = [line for line in body.decode().splitlines() if line.startswith("data: ")]
    check(status == 200 and frames[-1:] == ["data: [DONE]"], f"a streamed chat completion: {status}, {len(frames)} events")

    # Prefix caching on the device: a prompt that begins like the one before starts from a copy of its
    # KV cache (exact equality of the text is not asserted: bf16 kernels of other shapes may differ).
    hits = lambda: sum(s.value for s in samples(base) if s.name == "slm_prefix_cache_hits_total")
    shared = "Return the list of the values in the file, in the order given, and the number of them. " * 3
    before = hits()
    answers = [http("POST", f"{base}/generate", {"prompt": shared + end, "max_tokens": 16, "temperature": 0})
               for end in ("First?", "Second?")]
    found = hits() - before
    check(all(status == 200 for status, _ in answers) and found >= 48,
          f"a prompt that begins like the one before finds its prefix: {found:.0f} prompt tokens from the cache")

    # Structured output on the device: the grammar's mask moves to the model's device each token.
    verdict = {"type": "object", "additionalProperties": False, "required": ["answer", "count"],
               "properties": {"answer": {"enum": ["yes", "no"]}, "count": {"type": "integer", "minimum": 0, "maximum": 99}}}
    status, body = http("POST", f"{base}/v1/chat/completions",
                        {"model": "tiny", "messages": [{"role": "user", "content": "Is it empty?"}], "n": 4,
                         "max_tokens": 48, "temperature": 0.9, "seed": 3,
                         "response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": verdict}}})
    documents = [c["message"]["content"] for c in json.loads(body)["choices"]] if status == 200 else []
    def follows(text):
        try:
            d = json.loads(text)
        except ValueError:
            return False
        return set(d) == {"answer", "count"} and d["answer"] in ("yes", "no") and 0 <= d["count"] <= 99
    check(len(documents) == 4 and all(follows(d) for d in documents),
          f"response_format json_schema: 4 sampled choices, each JSON that follows the schema: {documents}")

REQUESTS = int(os.environ.get("GPU_CHECK_REQUESTS", "64"))
ROUNDS = int(os.environ.get("GPU_CHECK_ROUNDS", "3"))


def compare(title: str, configs: dict[str, dict[str, str]], counters: bool = False) -> dict[str, tuple]:
    """Tokens/s of each configuration's server, all running at once and loaded in turn (ROUNDS), so
    that a change in the machine over the run (clocks, a neighbour) falls on both alike: the median
    round of each, the mean batch size (generations per forward pass) over its rounds, and every round."""
    print(f"== {title} (same load: {REQUESTS} greedy requests x 128 tokens, 8 at a time; {ROUNDS} rounds, in turn)")
    results = {}
    with contextlib.ExitStack() as stack:
        bases = {label: stack.enter_context(server(model_dir, log_dir, **env)) for label, env in configs.items()}
        for base in bases.values():  # warm-up at the measured shapes (CUDA kernels, allocator)
            load(base, 8, 8, 128)
        passes = lambda base: {s.name: s.value for s in samples(base) if s.name.startswith("slm_forward_pass")}
        before = {label: passes(base) for label, base in bases.items()} if counters else {}
        rates = {label: [] for label in bases}
        for _ in range(ROUNDS):
            for label, base in bases.items():
                rates[label].append(load(base, REQUESTS, 8, 128)[0])
        for label, base in bases.items():
            mean = 0.0
            if counters:
                after = passes(base)
                fed = after["slm_forward_pass_generations_total"] - before[label]["slm_forward_pass_generations_total"]
                mean = fed / (after["slm_forward_passes_total"] - before[label]["slm_forward_passes_total"])
            results[label] = (sorted(rates[label])[ROUNDS // 2], mean, rates[label])
            batch = f"  mean batch {mean:4.1f}" if counters else ""
            print(f"  {label:<15} {results[label][0]:8.1f} tokens/s{batch}  (rounds: {', '.join(f'{r:.1f}' for r in rates[label])})")
    return results


off = {"SLM_METRICS_ENABLED": "false", "SLM_LOG_REQUESTS": "false"}  # no metrics, no drift, no request lines
results = compare("tokens/s, monitoring on vs off", {"monitoring on": {}, "monitoring off": off})
ratio = results["monitoring on"][0] / results["monitoring off"][0]
pairs = [a / b for a, b in zip(results["monitoring on"][2], results["monitoring off"][2])]
print(f"  on / off = {ratio:.3f}  (round by round: {', '.join(f'{r:.3f}' for r in pairs)})")
check(ratio >= 0.90, "monitoring keeps >= 90% of the tokens/s")

batching = compare("tokens/s, continuous batching vs one generation at a time",
                   {"batched": {}, "one at a time": {"SLM_MAX_BATCH_SIZE": "1"}}, counters=True)
gain = batching["batched"][0] / batching["one at a time"][0]
print(f"  batched / one at a time = {gain:.2f}x")
check(batching["batched"][1] > 1.5, "concurrent generations share forward passes (mean batch > 1.5)")
check(batching["one at a time"][1] == 1.0, "SLM_MAX_BATCH_SIZE=1: one generation per pass")
if HAVE_SMI:  # on the CPU rehearsal the gain is the 2-core machine's to give (bench/bench_batching.py)
    check(gain > 1.5, "on the GPU, batching makes > 1.5x the tokens/s of one generation at a time")

print(f"== {'all checks passed' if not failures else f'{len(failures)} check(s) failed'} (server logs in {log_dir})")
sys.exit(1 if failures else 0)
EOF
