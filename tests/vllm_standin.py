"""A scripted stand-in for `vllm serve`, for tests of serve.vllm on machines without a GPU.

It takes the arguments vLLM gets and answers the routes tuneloop uses the way vLLM 0.33 does: /health, /v1/models
(adapters with their parent), /v1/load_lora_adapter and /v1/unload_lora_adapter (mounted only when
VLLM_ALLOW_RUNTIME_LORA_UPDATING is set), and streamed /v1/chat/completions and /v1/completions whose answer is
"echo <model> max_tokens=<n>". Each POST body is appended to the `--record` file as a JSON line.
Test-only options: --record, --exit-at-start, --startup-delay, --ignore-sigterm, --child-pid-file.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--enable-lora", action="store_true")
    parser.add_argument("--max-loras", type=int)
    parser.add_argument("--max-lora-rank", type=int)
    parser.add_argument("--lora-modules", nargs="+", default=[])
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--exit-at-start", action="store_true")
    parser.add_argument("--startup-delay", type=float, default=0.0)
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--child-pid-file", type=Path)
    return parser.parse_args()


ARGS = parse_args()
RUNTIME_LORA = os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0").strip().lower() in ("1", "true")
ADAPTERS: dict[str, tuple[str, str]] = {}  # name -> (path, parent)
LOCK = threading.Lock()


def record(entry: dict) -> None:
    with LOCK, ARGS.record.open("a", encoding="utf-8") as log:
        log.write(json.dumps(entry) + "\n")


def error(code: int, message: str, param: str | None = None) -> dict:
    kind = {400: "BadRequestError", 404: "NotFoundError"}[code]
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - keep the test output quiet
        pass

    def send_body(self, code: int, body: dict | str) -> None:
        data = (json.dumps(body) if isinstance(body, dict) else body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json" if isinstance(body, dict) else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            self.send_body(200, "")
        elif self.path == "/v1/models":
            cards = [{"id": ARGS.served_model_name, "object": "model", "root": ARGS.model, "parent": None}]
            with LOCK:
                cards += [{"id": n, "object": "model", "root": p, "parent": b} for n, (p, b) in ADAPTERS.items()]
            self.send_body(200, {"object": "list", "data": cards})
        else:
            self.send_body(404, {"detail": "Not Found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        record({"path": self.path, "body": body})
        if self.path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter") and RUNTIME_LORA:
            code, answer = (load if self.path == "/v1/load_lora_adapter" else unload)(body)
            self.send_body(code, answer)
        elif self.path in ("/v1/chat/completions", "/v1/completions"):
            self.complete(body, chat=self.path == "/v1/chat/completions")
        else:
            self.send_body(404, {"detail": "Not Found"})

    def complete(self, body: dict, chat: bool) -> None:
        model, max_tokens = body["model"], body["max_tokens"]
        with LOCK:
            known = model == ARGS.served_model_name or model in ADAPTERS
        if not known:
            return self.send_body(404, error(404, f"The model `{model}` does not exist.", "model"))
        if max_tokens > 1000:
            return self.send_body(400, error(400, f"max_tokens={max_tokens} is more than the context", "max_tokens"))
        text = body["messages"][-1]["content"] if chat else body["prompt"]
        slow = text == "slow"
        pieces = ["."] * 500 if slow else ["echo ", model, f" max_tokens={max_tokens}"]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()

        def choice(piece: str, finish_reason: str | None = None) -> dict:
            content = {"delta": {"content": piece}} if chat else {"text": piece}
            return {"index": 0, **content, "finish_reason": finish_reason}

        events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}] if chat else []
        events += [{"choices": [choice(piece)]} for piece in pieces]
        events.append({"choices": [choice("", "stop")]})
        usage = {"prompt_tokens": len(text.split()), "completion_tokens": len(pieces)}
        events.append({"choices": [], "usage": {**usage, "total_tokens": sum(usage.values())}})
        try:
            for event in events:
                self.wfile.write(f"data: {json.dumps({'model': model, **event})}\n\n".encode())
                self.wfile.flush()
                if slow:
                    time.sleep(0.02)
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            record({"aborted": model})


def load(body: dict) -> tuple[int, dict | str]:
    name, path = body["lora_name"], body["lora_path"]
    with LOCK:
        if name in ADAPTERS:
            message = f"The lora adapter '{name}' has already been loaded."
            return 400, error(400, message)
        if not Path(path).is_dir():
            return 404, error(404, f"Loading lora {name} failed: No adapter found for {path}")
        ADAPTERS[name] = (path, ARGS.served_model_name)
    return 200, f"Success: LoRA adapter '{name}' added successfully."


def unload(body: dict) -> tuple[int, dict | str]:
    name = body["lora_name"]
    with LOCK:
        if ADAPTERS.pop(name, None) is None:
            return 404, error(404, f"The lora adapter '{name}' cannot be found.")
    return 200, f"Success: LoRA adapter '{name}' removed successfully."


def main() -> None:
    print(f"standin: loading {ARGS.model}", flush=True)
    if ARGS.exit_at_start:
        print("ValueError: standin refuses to start", flush=True)
        sys.exit(3)
    if ARGS.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if ARGS.child_pid_file:  # like vLLM's engine-core process
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        ARGS.child_pid_file.write_text(str(child.pid))
    for item in ARGS.lora_modules:
        module = json.loads(item)
        if not Path(module["path"]).is_dir():  # vLLM stops when a --lora-modules adapter does not load
            sys.exit(f"Loading lora {module['name']} failed: No adapter found for {module['path']}")
        ADAPTERS[module["name"]] = (module["path"], module.get("base_model_name") or ARGS.served_model_name)
    time.sleep(ARGS.startup_delay)
    server = ThreadingHTTPServer((ARGS.host, ARGS.port), Handler)
    server.daemon_threads = True
    print(f"standin: serving on {ARGS.host}:{ARGS.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
