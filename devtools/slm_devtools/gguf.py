"""The tiny model (slm_devtools.tinymodel) converted to GGUF, for the real llama-server.

    python -m slm_devtools.gguf            # convert (or find) it and print the .gguf file's path

The conversion is llama.cpp's own `convert_hf_to_gguf.py`, with the gguf-py package beside it, from the
very sources `make deps` built `llama-server` from (scripts/deps/build-tools.sh keeps them in the cache),
so the writer and the reader of the file are the same version. It runs in a child process: the script
imports top-level modules named `conversion` and `gguf` that have no place in this interpreter.

Two deviations, and why. The converter names a BPE tokenizer's pre-tokenizer by hashing how it splits a
fixed text, and knows only the hashes of published models. The tiny model's tokenizer is trained here
(byte-level BPE with GPT-2's split rule, `pre_tokenizers.ByteLevel`), so its hash is new; the driver
below answers "gpt-2" for it, which is exactly its rule, and leaves every known hash to the converter.
And the GPT-2 converter reads the context length from `n_ctx`, a key transformers 5 no longer writes:
it is given `n_positions`, the same number.

Written as float32 (the model is 0.7 M parameters): llama-server then computes what the PyTorch
model computes, up to float rounding.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from slm_devtools.tinymodel import TINY_MODEL_VERSION, ensure_tiny_model
from slm_devtools.tools import ToolMissing, bin_dir, versions
from slm_server.paths import cache_dir

# Bump when the conversion below changes: a new file is written, old ones are left alone.
GGUF_RECIPE_VERSION = "1"
OUTTYPE = "f32"

_DRIVER = r"""
import sys
source = sys.argv[1]
sys.path[:0] = [source + "/gguf-py", source]
from conversion.base import TextModel
known = TextModel.get_vocab_base_pre

def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        # A tokenizer trained here: byte-level BPE splitting text by GPT-2's rule.
        return "gpt-2"

TextModel.get_vocab_base_pre = get_vocab_base_pre

from conversion.gpt2 import GPT2Model
gpt2_parameters = GPT2Model.set_gguf_parameters

def set_gguf_parameters(self):
    # transformers 5 no longer writes GPT-2's legacy `n_ctx`; the context length is `n_positions`.
    self.hparams.setdefault("n_ctx", self.hparams["n_positions"])
    gpt2_parameters(self)

GPT2Model.set_gguf_parameters = set_gguf_parameters
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
convert_hf_to_gguf.main()
"""


def llamacpp_source_dir() -> Path:
    """The pinned llama.cpp sources that `make deps` built llama-server from (linked at .bin/llama.cpp-src)."""
    path = bin_dir() / "llama.cpp-src"
    if not (path / "convert_hf_to_gguf.py").is_file():
        version = versions().get("LLAMACPP_VERSION", "?")
        raise ToolMissing(f"llama.cpp {version} sources not found at {path}: run `make deps`.")
    return path.resolve()


def tiny_gguf_path() -> Path:
    version = versions()["LLAMACPP_VERSION"]
    name = f"tiny-gpt2-{TINY_MODEL_VERSION}-{OUTTYPE}-llamacpp-{version}-r{GGUF_RECIPE_VERSION}.gguf"
    return cache_dir() / "models" / name


def convert(model_dir: Path, target: Path, *, outtype: str = OUTTYPE, log=print) -> None:
    """Convert the Hugging Face model directory `model_dir` into the GGUF file `target`."""
    source = llamacpp_source_dir()
    command = [sys.executable, "-c", _DRIVER, str(source), str(model_dir), "--outfile", str(target),
               "--outtype", outtype, "--model-name", model_dir.name]
    env = {**os.environ, "PYTHONPATH": ""}  # nothing of ours shadows the converter's own modules
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0 or not target.is_file():
        raise RuntimeError(
            f"llama.cpp's convert_hf_to_gguf.py failed on {model_dir} (exit {done.returncode}):\n{done.stderr[-4000:]}"
        )
    log(f"[gguf] wrote {target} ({target.stat().st_size} bytes)")


def ensure_tiny_gguf(log=print) -> Path:
    """The tiny model as a GGUF file, converted on first use (once per machine, under a file lock)."""
    from filelock import FileLock

    target = tiny_gguf_path()
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_tiny_model(log=log)
    with FileLock(str(target) + ".lock", timeout=900):
        if target.is_file():  # another process converted it while we waited
            return target
        work = target.with_name(f".{target.name}.converting-{os.getpid()}")
        work.unlink(missing_ok=True)
        try:
            convert(model_dir, work, log=log)
            work.rename(target)  # appears whole or not at all
        finally:
            work.unlink(missing_ok=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quiet", action="store_true", help="print only the file's path")
    args = parser.parse_args(argv)
    path = ensure_tiny_gguf(log=(lambda *_: None) if args.quiet else lambda m: print(m, file=sys.stderr))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
