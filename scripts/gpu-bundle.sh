#!/usr/bin/env bash
# Packs what scripts/gpu-check.sh needs on a GPU machine that has no network, into .gpu/ (git-ignored):
#   .gpu/wheels/  the server's web stack and its Hugging Face stack as wheels for the GPU machine's
#                 Python (fastapi, starlette, pydantic, uvicorn, orjson, prometheus-client, nvidia-ml-py,
#                 llguidance, transformers, tokenizers, huggingface-hub and their needs), at the versions
#                 of requirements.lock, so that the GPU runs the code the tests ran;
#   .gpu/cache/   the project's tiny model, built here (so the GPU machine spends no time on it).
# The GPU machine's python3 must already hold torch, safetensors, numpy and scipy (the heavy,
# CUDA-specific part that a GPU image ships with) and the common small packages named in `image` below.
#
#   scripts/gpu-bundle.sh                          # wheels for CPython 3.12 on x86-64 Linux
#   GPU_PYTHON_VERSION=3.11 scripts/gpu-bundle.sh  # for another Python
#
# Then, on the GPU machine, from a copy of this checkout with .gpu/ in it:
#   GPU_CHECK_BUNDLE=.gpu scripts/gpu-check.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cd "$repo"
PYTHON="${PYTHON:-$repo/.venv/bin/python}"  # the project's environment: builds the tiny model
# Any Python with pip (the project's has none: uv made it, and make puts it first on PATH).
if [ -z "${PIP_PYTHON:-}" ]; then
  for candidate in $(which -a python3 python3.12 python3.11 2>/dev/null); do
    if "$candidate" -m pip --version >/dev/null 2>&1; then PIP_PYTHON="$candidate"; break; fi
  done
  [ -n "${PIP_PYTHON:-}" ] || { echo "gpu-bundle: no python3 with pip found (set PIP_PYTHON)" >&2; exit 1; }
fi
version="${GPU_PYTHON_VERSION:-3.12}"
out="$repo/.gpu"

# What the GPU image is expected to hold is left out; everything else the server imports goes in.
bundle=(fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv annotated-types
        typing-inspection annotated-doc typing-extensions anyio idna sniffio uvicorn click h11 httptools
        orjson prometheus-client nvidia-ml-py opentelemetry-api llguidance
        transformers tokenizers huggingface-hub hf-xet httpx2 httpcore2 certifi truststore)
pins=()
for name in "${bundle[@]}"; do
  pin="$(grep -i "^${name}==" requirements.lock || true)"
  [ -n "$pin" ] || { echo "gpu-bundle: $name is not pinned in requirements.lock" >&2; exit 1; }
  pins+=("$pin")
done

rm -rf "$out/wheels"
mkdir -p "$out/wheels" "$out/cache/models"
platforms=()
for tag in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 \
           manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
"$PIP_PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
  "${platforms[@]}" -d "$out/wheels" "${pins[@]}"

# Every requirement of a bundled wheel (for that Python, on Linux) is bundled too, or is one the GPU
# image holds: a wheel that needs something else would fail there, with no network to fetch it.
"$PYTHON" - "$out/wheels" "$version" <<'EOF'
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

wheels, version = Path(sys.argv[1]), sys.argv[2]
image = {"torch", "safetensors", "numpy", "scipy",  # and small ones a Python image with torch has:
         "filelock", "fsspec", "packaging", "pyyaml", "regex", "tqdm", "typer", "jinja2", "markupsafe"}
environment = {"python_version": version, "python_full_version": f"{version}.0", "sys_platform": "linux",
               "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
               "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
names, needs = set(), []
for wheel in sorted(wheels.glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    for line in lines:
        if line.startswith("Name: "):
            names.add(canonicalize_name(line[6:]))
        elif line.startswith("Requires-Dist: "):
            req = Requirement(line[15:])
            if req.marker is None or req.marker.evaluate(environment):
                needs.append((wheel.name, canonicalize_name(req.name)))
missing = sorted({f"{need} (for {wheel})" for wheel, need in needs if need not in names | image})
if missing:
    sys.exit("gpu-bundle: the bundle lacks " + ", ".join(missing))
print(f"gpu-bundle: {len(names)} wheels for Python {version}; their requirements are all bundled or in the image")
EOF

model="$(PYTHONPATH="$repo/server" "$PYTHON" -m slm_devtools.tinymodel --quiet)"
rm -rf "$out/cache/models/$(basename "$model")"
cp -r "$model" "$out/cache/models/"
du -sh "$out" | awk '{print "gpu-bundle: " $2 " holds " $1}'
