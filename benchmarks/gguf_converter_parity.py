"""Our GGUF writer against llama.cpp's own converter, tensor by tensor.

    python benchmarks/gguf_converter_parity.py [--model DIR] [--quants f16,q8_0]

Converts one Hugging Face model directory (default: the bundled SmolLM2-135M-Instruct; or a
`tuneloop export --format merged` folder) twice per quantization: with llama.cpp's convert_hf_to_gguf.py
and with tuneloop's writer (`tuneloop.export.gguf_file.write_gguf`), then compares every tensor's type and
bytes and the set of metadata keys. The converter is taken from the llama-cpp-python source distribution
(which vendors llama.cpp: its convert_hf_to_gguf.py, conversion/ and gguf-py/); nothing is compiled. The
converter imports sentencepiece for Llama models, so that is installed beside it (--work), not into this
environment.

Identical tensors mean that whatever a quantization does to the answers, llama.cpp's converter would do
exactly the same: the writer adds no error of its own. Prints a final JSON line, per quantization:
tensors, identical_tensors, the names of those that differ, and the metadata keys only one side has.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
DEFAULT_WORK = Path("~/.cache/tuneloop/llamacpp-converter").expanduser()
# Keys that name the writer or the run, not the model.
PROVENANCE_KEYS = ("general.", "GGUF.")


def ensure_converter(work: Path) -> Path:
    """Unpack llama.cpp's converter from the llama-cpp-python sdist into `work`; returns its folder."""
    root = work / "llama.cpp"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    LLAMA_CPP_PYTHON, "-d", str(work)], check=True)
    sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            _, _, inside = member.name.partition("/vendor/llama.cpp/")
            if inside.startswith(wanted) and member.isfile():
                member.name = inside
                archive.extract(member, root, filter="data")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(work / "site"), "sentencepiece"],
                   check=True)
    return root


def convert_with_llama_cpp(converter: Path, model_dir: Path, quant: str, out: Path) -> None:
    env_path = f"{converter / 'gguf-py'}:{converter}:{converter.parent / 'site'}"
    done = subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", quant,
                           "--outfile", str(out)], env={**os.environ, "PYTHONPATH": env_path},
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"convert_hf_to_gguf.py failed:\n{done.stderr[-3000:]}")


def compare(ours: Path, theirs: Path) -> dict:
    import gguf
    import numpy as np

    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    tensors_a, tensors_b = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    differ = [name for name in sorted(set(tensors_a) | set(tensors_b))
              if name not in tensors_a or name not in tensors_b
              or tensors_a[name].tensor_type != tensors_b[name].tensor_type
              or not np.array_equal(np.asarray(tensors_a[name].data).view(np.uint8),
                                    np.asarray(tensors_b[name].data).view(np.uint8))]
    keys_a = {k for k in a.fields if not k.startswith(PROVENANCE_KEYS)}
    keys_b = {k for k in b.fields if not k.startswith(PROVENANCE_KEYS)}
    return {"tensors": len(tensors_b), "identical_tensors": len(tensors_b) - len(differ), "differ": differ[:20],
            "keys_only_ours": sorted(keys_a - keys_b), "keys_only_llama_cpp": sorted(keys_b - keys_a)}


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.config import DEFAULT_BASE_MODEL
    from tuneloop.export.gguf_file import write_gguf
    from tuneloop.models import resolve_base_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a Hugging Face model directory (default: the bundled model)")
    parser.add_argument("--quants", default="f16,q8_0")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    args = parser.parse_args()

    model_dir = args.model or resolve_base_model(DEFAULT_BASE_MODEL, Path("~/.cache/tuneloop").expanduser()).path
    converter = ensure_converter(args.work)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    results = {}
    for quant in args.quants.split(","):
        ours, theirs = args.work / f"ours-{quant}.gguf", args.work / f"llama-cpp-{quant}.gguf"
        for stale in (ours, theirs):
            stale.unlink(missing_ok=True)
        write_gguf(model, tokenizer, ours, quant, {"name": model_dir.name})
        convert_with_llama_cpp(converter, model_dir, quant, theirs)
        results[quant] = compare(ours, theirs)
        print(f"{quant}: {results[quant]['identical_tensors']}/{results[quant]['tensors']} tensors identical",
              file=sys.stderr)
    print(json.dumps({"model": str(model_dir), "converter": f"{LLAMA_CPP_PYTHON} sdist, vendor/llama.cpp", **results}))


if __name__ == "__main__":
    main()
