"""Exported GGUFs in llama.cpp itself: a registered version exported as f16 and q8_0 GGUF, loaded by
llama-cpp-python (built from its source distribution, so llama.cpp is compiled here, nothing prebuilt), answering
the run's held-out test rows with llama.cpp's own chat formatting (the template embedded in the GGUF), greedily.

    python benchmarks/gguf_llamacpp.py examples/ticket-triage/config.yaml [--version N] [--rows 45]

Needs a registered version of the config's model (`tuneloop run CONFIG` registers one), exported with
`tuneloop.export`, or with `--adapter DIR` an adapter directory (e.g. runs/NAME/train/adapter) written by the
same GGUF writer without the registry; and the run's prepared data (the test split under runs/NAME/data).
llama-cpp-python is installed into its own virtual environment (--venv, default ~/.cache/tuneloop/llamacpp-venv)
on first use: `pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36` with
CMAKE_BUILD_PARALLEL_LEVEL=2 (4 to 40 minutes on two cores, by CPU), for this CPU's features without AMX (see
`cmake_args`; CMAKE_ARGS overrides). The reference answers are tuneloop's own: base model + adapter through PEFT, in
fp32, greedy, as the eval stage generates them.

Prints a final JSON line with, per quant: schema_valid (share of answers that satisfy the answer schema),
identical_to_adapter (share of answers identical to the PEFT reference), closed_fields_accuracy and
fields_same_as_adapter (see `quality` and `compare`), tokens_per_s (llama.cpp's generated tokens over its
request time, prompt processing included, one request at a time, --threads threads); and under "adapter" the
reference's own schema_valid and closed_fields_accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
DEFAULT_VENV = Path("~/.cache/tuneloop/llamacpp-venv").expanduser()

# Runs inside the llama-cpp-python environment: one GGUF, every prompt, one JSON line per answer.
WORKER = """
import json, sys, time
from llama_cpp import Llama

path, max_tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=4096, n_threads=threads, n_batch=512, verbose=False, seed=0)
for line in sys.stdin:
    messages = json.loads(line)
    started = time.perf_counter()
    reply = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0, top_k=1,
                                       repeat_penalty=1.0)
    seconds = time.perf_counter() - started
    print(json.dumps({"text": reply["choices"][0]["message"]["content"] or "",
                      "tokens": reply["usage"]["completion_tokens"], "seconds": seconds}), flush=True)
"""


# llama.cpp's flag for each CPU feature /proc/cpuinfo reports. AMX stays off: where the kernel or a sandbox
# does not hand the process AMX tile state, the AMX kernels llama.cpp uses for q8_0 and q4_0 weights die with
# SIGILL (they did on a Xeon whose cpuinfo lists amx_int8), so the build is -march=native without them.
CPU_FLAGS = {"avx": "GGML_AVX", "avx2": "GGML_AVX2", "fma": "GGML_FMA", "f16c": "GGML_F16C", "bmi2": "GGML_BMI2",
             "avx_vnni": "GGML_AVX_VNNI", "avx512f": "GGML_AVX512", "avx512vbmi": "GGML_AVX512_VBMI",
             "avx512_vnni": "GGML_AVX512_VNNI", "avx512_bf16": "GGML_AVX512_BF16"}


def cmake_args() -> str:
    """CMAKE_ARGS for the build: the environment's if set, else this CPU's features without AMX."""
    if os.environ.get("CMAKE_ARGS"):
        return os.environ["CMAKE_ARGS"]
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    features = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []))
    if not features:  # not Linux on x86: llama.cpp's own native build
        return "-DLLAVA_BUILD=OFF"
    enabled = {flag for feature, flag in CPU_FLAGS.items() if feature in features}
    flags = " ".join(f"-D{flag}={'ON' if flag in enabled else 'OFF'}" for flag in CPU_FLAGS.values())
    return f"-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF {flags} -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"


def ensure_llama_cpp(venv: Path) -> float:
    """Build llama-cpp-python from source into `venv` unless it is there, built with the same CMAKE_ARGS;
    returns the seconds the build took."""
    python, args = venv / "bin" / "python", cmake_args()
    built_with = venv / "tuneloop-cmake-args.txt"
    if (python.is_file() and built_with.is_file() and built_with.read_text() == args
            and subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode == 0):
        return 0.0
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": "2", "CMAKE_ARGS": args}
    subprocess.run([venv / "bin" / "pip", "install", "--no-cache-dir", "--no-binary", "llama-cpp-python",
                    LLAMA_CPP_PYTHON], check=True, env=env)
    built_with.write_text(args)
    return time.perf_counter() - started


def test_rows(cfg, rows: int) -> tuple[list[list[dict[str, str]]], list[str], dict | None]:
    """The first `rows` held-out test rows: their prompts (every turn but the final answer), their reference
    answers, and the answer schema."""
    from tuneloop.artifacts import Dataset, load_meta

    data = load_meta(Dataset, cfg.run_dir / "data", "data CONFIG")
    chats = [json.loads(line)["messages"] for line in data.test.read_text(encoding="utf-8").splitlines()][:rows]
    schema = json.loads(data.answer_schema.read_text()) if data.answer_schema else None
    return [chat[:-1] for chat in chats], [chat[-1]["content"] for chat in chats], schema


def quality(texts: list[str], gold: list[str], schema: dict | None) -> dict:
    """schema_valid (share of answers satisfying the answer schema) and closed_fields_accuracy (per enum, boolean
    or number field of the schema, the share of rows whose value matches the test row's reference)."""
    from tuneloop.evaluate.graders import categorical_fields, field_matches, schema_valid

    fields = categorical_fields(schema) if schema else []
    matches = [field_matches(t, g, fields) or {} for t, g in zip(texts, gold)]
    return {
        "schema_valid": round(sum(schema_valid(t, schema) for t in texts) / len(texts), 4) if schema else None,
        "closed_fields_accuracy": {f: round(sum(m.get(f, False) for m in matches) / len(texts), 4) for f in fields},
    }


def identical(texts: list[str], adapter: list[str]) -> list[bool]:
    """Per answer: the same text as the adapter's answer to the same prompt."""
    return [t.strip() == a.strip() for t, a in zip(texts, adapter)]


def compare(texts: list[str], adapter: list[str], gold: list[str], schema: dict | None) -> dict:
    """Answers against the adapter's own answers to the same prompts: identical_to_adapter and
    fields_same_as_adapter (share of closed-field values equal to the adapter's); and their `quality`."""
    from tuneloop.evaluate.graders import categorical_fields, field_matches

    fields = categorical_fields(schema) if schema else []
    same = [field_matches(t, a, fields) or {} for t, a in zip(texts, adapter)]
    return {
        "identical_to_adapter": round(sum(identical(texts, adapter)) / len(texts), 4),
        **quality(texts, gold, schema),
        "fields_same_as_adapter": round(sum(sum(m.values()) for m in same) / max(sum(map(len, same)), 1), 4)
        if fields else None,
    }


def llama_cpp_answers(venv: Path, gguf: Path, prompts, max_tokens: int, threads: int = 2) -> list[dict]:
    stdin = "".join(json.dumps(p) + "\n" for p in prompts)
    done = subprocess.run([venv / "bin" / "python", "-c", WORKER, str(gguf), str(max_tokens), str(threads)], input=stdin,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"llama.cpp failed on {gguf.name}:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    from tuneloop.config import load_config
    from tuneloop.evaluate.generate import generate_answers
    from tuneloop.export import export
    from tuneloop.export.gguf_file import write_gguf
    from tuneloop.models import load_tokenizer, resolve_base_model
    from tuneloop.registry import find_version, version_dir
    from tuneloop.train.merge import merged_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--version", type=int, default=None)
    parser.add_argument("--adapter", type=Path, default=None, help="an adapter directory instead of a registered version")
    parser.add_argument("--rows", type=int, default=45)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the config's eval.max_new_tokens")
    parser.add_argument("--quants", default="f16,q8_0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    args = parser.parse_args()

    build_s = ensure_llama_cpp(args.venv)
    cfg = load_config(args.config)
    max_tokens = args.max_new_tokens or cfg.eval.max_new_tokens or 128
    prompts, gold, schema = test_rows(cfg, args.rows)
    base = resolve_base_model(cfg.base_model, cfg.cache_dir, cfg.trust_remote_code)
    if args.adapter is None:
        version = find_version(cfg.registry, cfg.model_name, base.name, args.version)
        adapter, label = version_dir(cfg.registry, version.name, version.version, base_model=base.name), None
    else:
        adapter, label = args.adapter.resolve(), str(args.adapter)

    reference = [g.text for g in generate_answers(base, adapter, prompts, max_tokens, cfg.eval.batch_size, "PEFT")]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for quant in args.quants.split(","):
            started = time.perf_counter()
            if label is None:
                gguf = next(export(cfg, "gguf", quant=quant, version=version.version, out=Path(scratch) / quant).glob("*.gguf"))
            else:
                gguf = Path(scratch) / f"adapter-{quant}.gguf"
                write_gguf(merged_model(base, adapter), load_tokenizer(base), gguf, quant, {"name": label})
            export_s = time.perf_counter() - started
            answers = llama_cpp_answers(args.venv, gguf, prompts, max_tokens, args.threads)
            texts = [a["text"].strip() for a in answers]
            results[quant] = {
                "file_mb": round(gguf.stat().st_size / 2**20, 1),
                "export_s": round(export_s, 1),
                **compare(texts, reference, gold, schema),
                "tokens_per_s": round(sum(a["tokens"] for a in answers) / sum(a["seconds"] for a in answers), 1),
            }
            for text, ref in list(zip(texts, reference))[:2]:
                print(f"[{quant}] llama.cpp: {text[:100]!r}\n[{quant}] PEFT:      {ref.strip()[:100]!r}", file=sys.stderr)
    print(json.dumps({
        "model": label or f"{version.name}-v{version.version}",
        "threads": args.threads,
        "base_model": base.name,
        "rows": len(prompts),
        "max_new_tokens": max_tokens,
        "llama_cpp_python": LLAMA_CPP_PYTHON.split("==")[1],
        "build_s": round(build_s, 1),
        "adapter": quality(reference, gold, schema),
        **{quant: figures for quant, figures in results.items()},
    }))


if __name__ == "__main__":
    main()
