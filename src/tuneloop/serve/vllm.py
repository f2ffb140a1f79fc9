"""The GPU production engine: vLLM's own OpenAI server in a subprocess on loopback, serving the base model and
its LoRA adapters. tuneloop starts it, keeps its adapters in step with the registry and forwards generations.

vLLM cannot serve a fully fine-tuned version beside the adapters of one base model; those need the builtin engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import signal
import socket
from collections import deque
from typing import Any

import httpx

from tuneloop.config import ServeConfig
from tuneloop.errors import TuneloopError
from tuneloop.serve.engine import (
    Completion,
    EngineRequest,
    Generation,
    InvalidRequestError,
    ServedModel,
    UnknownModelError,
)

logger = logging.getLogger(__name__)

# vLLM mounts /v1/load_lora_adapter and /v1/unload_lora_adapter only when this is set.
VLLM_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
STOP_TIMEOUT = 30.0  # seconds vLLM gets to shut down after SIGTERM before its process group is killed
OUTPUT_LINES = 40  # lines of vLLM's output quoted when it fails to start
CONTROL_TIMEOUT = httpx.Timeout(30.0)
# A request can wait in vLLM's queue a long time before its first token; a client that leaves closes it instead.
GENERATION_TIMEOUT = httpx.Timeout(30.0, read=None)


def vllm_command(cfg: ServeConfig, base: ServedModel) -> list[str]:
    """The command starting vLLM's OpenAI server on loopback for `base`, ready to load adapters at run time.
    None is named on the command line: vLLM exits when one of its `--lora-modules` fails to load, while the
    runtime endpoint refuses that one adapter and serves the rest."""
    vllm = cfg.vllm
    command = [
        *vllm.command,
        str(base.path),
        "--host", "127.0.0.1",
        "--port", str(vllm.port),
        "--served-model-name", base.name,
        "--enable-lora",
        "--max-loras", str(vllm.max_loras),
        "--max-lora-rank", str(vllm.max_lora_rank),
    ]  # fmt: skip
    return [*command, *vllm.extra_args]


class VllmEngine:
    """An `Engine` answering through vLLM's OpenAI server, which it runs as a subprocess in its own process group."""

    def __init__(self, cfg: ServeConfig, base: ServedModel, versions: list[ServedModel]):
        for version in versions:
            _check_servable(version, base)
        self.cfg = cfg
        self.base = base
        self._versions = list(versions)
        self._served: list[ServedModel] = []  # the versions vLLM has loaded, in the registry's order
        self._process: asyncio.subprocess.Process | None = None
        self._output: deque[str] = deque(maxlen=OUTPUT_LINES)
        self._pump: asyncio.Task[None] | None = None
        self._sync_lock = asyncio.Lock()
        self._client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{cfg.vllm.port}",
            timeout=CONTROL_TIMEOUT,
            trust_env=False,  # loopback: no proxy from the environment
            limits=httpx.Limits(max_connections=None),  # vLLM queues requests itself
        )

    def models(self) -> list[ServedModel]:
        return [self.base, *self._served]

    async def start(self) -> None:
        """Start vLLM, wait until it answers /health, then load the adapters it lacks."""
        port = self.cfg.vllm.port
        if _port_taken(port):
            raise TuneloopError(f"port {port} (serve.vllm.port) is in use already; stop what listens there or pick one")
        command = vllm_command(self.cfg, self.base)
        logger.info("starting vLLM: %s", shlex.join(command))
        try:
            self._process = await asyncio.create_subprocess_exec(
                *command,
                env={**os.environ, **VLLM_ENV},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own process group, so close() also reaches vLLM's workers
            )
        except OSError as err:
            raise TuneloopError(f"could not start vLLM with {command[0]!r} (serve.vllm.command): {err}") from err
        self._pump = asyncio.create_task(self._log_output(self._process.stdout))
        try:
            await self._wait_healthy()
        except BaseException:
            await self.close()
            raise
        await self.sync(self._versions)

    async def sync(self, versions: list[ServedModel]) -> list[ServedModel]:
        """Keep vLLM in step with the registry: load the adapters of `versions` it lacks and unload the ones not
        among them. A version vLLM refuses is logged and not served; the rest go on. Returns the served versions."""
        wanted = {v.name: v for v in versions if _servable(v, self.base)}
        async with self._sync_lock:
            loaded = await self._loaded_adapters()
            stale = {name for name, path in loaded.items() if name not in wanted or path != str(wanted[name].path)}
            # Stop routing requests to what is about to go before vLLM drops it.
            self._served = [wanted[v.name] for v in self._served if v.name in wanted and v.name not in stale]
            for name in stale:
                await self._unload(name)
            served = []
            for name, version in wanted.items():
                if (name in loaded and name not in stale) or await self._load(version):
                    served.append(version)
            self._served = served
            self._versions = list(versions)
            return list(self._served)

    def generate(self, request: EngineRequest) -> Generation:
        names = [model.name for model in self.models()]
        if request.model not in names:
            raise UnknownModelError(request.model, names)
        if request.messages is not None:
            path, body = "/v1/chat/completions", {"messages": request.messages}
        elif request.prompt is not None:
            path, body = "/v1/completions", {"prompt": request.prompt}
        else:
            raise InvalidRequestError("a request needs `messages` or a `prompt`", param="messages")
        return self._stream(path, {**body, **_request_fields(request)})

    async def close(self) -> None:
        """Stop vLLM: SIGTERM to its process group, SIGKILL to what is left of it after STOP_TIMEOUT seconds."""
        await self._client.aclose()
        process, self._process = self._process, None
        if process is None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            logger.warning("vLLM did not stop within %g s of SIGTERM; killing it", STOP_TIMEOUT)
        _signal_group(process.pid, signal.SIGKILL)  # also any worker that outlived the server process
        await process.wait()
        await self._drain_output()

    async def _stream(self, path: str, body: dict[str, Any]) -> Generation:
        parts: list[str] = []
        finish_reason, usage = "stop", {}
        try:
            # Leaving this block early (the caller closed the generation) closes the connection; vLLM then aborts
            # the request.
            async with self._client.stream("POST", path, json=body, timeout=GENERATION_TIMEOUT) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise _vllm_error(response)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line.removeprefix("data:").strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:  # how vLLM reports a failure once the stream has begun
                        raise _stream_error(event["error"])
                    usage = event.get("usage") or usage
                    for choice in event.get("choices", []):
                        piece = choice["delta"].get("content") if "delta" in choice else choice.get("text")
                        if piece:
                            parts.append(piece)
                            yield piece
                        finish_reason = choice.get("finish_reason") or finish_reason
        except httpx.TransportError as err:
            raise TuneloopError(f"vLLM stopped answering {path}: {err!r}") from err
        yield Completion(
            text="".join(parts),
            finish_reason="length" if finish_reason == "length" else "stop",
            prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0),
        )

    async def _wait_healthy(self) -> None:
        assert self._process is not None
        timeout = self.cfg.vllm.startup_timeout
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if self._process.returncode is not None:
                await self._drain_output()
                raise TuneloopError(
                    f"vLLM exited with code {self._process.returncode} while starting; its last output:\n"
                    + "\n".join(self._output)
                )
            try:
                if (await self._client.get("/health", timeout=5.0)).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            if asyncio.get_running_loop().time() > deadline:
                raise TuneloopError(
                    f"vLLM did not answer /health within {timeout:g} s (serve.vllm.startup_timeout); its last "
                    "output:\n" + "\n".join(self._output)
                )
            await asyncio.sleep(0.5)

    async def _log_output(self, stream: asyncio.StreamReader | None) -> None:
        """Log vLLM's output line by line and keep its last lines for error messages."""
        assert stream is not None
        pending = b""
        while True:
            chunk = await stream.read(65536)
            # Progress bars redraw with "\r": each redraw is a line of its own.
            *lines, pending = (pending + chunk).replace(b"\r", b"\n").split(b"\n")
            if not chunk:
                lines.append(pending)
            for line in filter(None, lines):
                text = line.decode(errors="replace").rstrip()
                self._output.append(text)
                logger.info("vllm: %s", text)
            if not chunk:
                return

    async def _drain_output(self) -> None:
        """Wait (briefly) until the last of vLLM's output is read; a worker still holding the pipe does not block."""
        if self._pump is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._pump), 2.0)
            except TimeoutError:
                pass

    async def _loaded_adapters(self) -> dict[str, str | None]:
        """The adapters vLLM serves now: name -> the path it loaded them from."""
        response = await self._control("GET", "/v1/models")
        if response.status_code != 200:
            status, message = response.status_code, _error_message(response)
            raise TuneloopError(f"vLLM answered /v1/models with HTTP {status}: {message}")
        return {card["id"]: card.get("root") for card in response.json()["data"] if card["id"] != self.base.name}

    async def _load(self, version: ServedModel) -> bool:
        body = {"lora_name": version.name, "lora_path": str(version.path)}
        response = await self._control("POST", "/v1/load_lora_adapter", body)
        if response.status_code == 200:
            logger.info("vLLM loaded %s from %s", version.name, version.path)
            return True
        logger.warning(
            "vLLM refused to load %s from %s (HTTP %d: %s); it is not served",
            version.name, version.path, response.status_code, _error_message(response),
        )  # fmt: skip
        return False

    async def _unload(self, name: str) -> None:
        response = await self._control("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        if response.status_code == 200:
            logger.info("vLLM unloaded %s", name)
        else:
            status, message = response.status_code, _error_message(response)
            logger.warning("vLLM refused to unload %s (HTTP %d: %s)", name, status, message)

    async def _control(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        try:
            return await self._client.request(method, path, json=body)
        except httpx.TransportError as err:
            raise TuneloopError(f"vLLM did not answer {path}: {err!r}") from err


def _check_servable(version: ServedModel, base: ServedModel) -> None:
    if version.kind == "full":
        raise TuneloopError(
            f"{version.name} is a fully fine-tuned model, which vLLM cannot serve beside the LoRA adapters of "
            f"{base.name}; serve it with `serve.engine: builtin`"
        )
    if version.kind != "adapter" or version.parent != base.name or version.name == base.name:
        raise TuneloopError(f"{version.name} is not a LoRA adapter of {base.name}, the only model this vLLM serves")


def _servable(version: ServedModel, base: ServedModel) -> bool:
    try:
        _check_servable(version, base)
    except TuneloopError as err:
        logger.warning("%s; it is not served", err)
        return False
    return True


def _request_fields(request: EngineRequest) -> dict[str, Any]:
    """The body fields of a streamed vLLM request beside the messages or prompt."""
    sampling = request.sampling
    fields: dict[str, Any] = {
        "model": request.model,
        "max_tokens": sampling.max_tokens,
        # Sent also when unset: vLLM would otherwise sample with the model's generation_config defaults.
        "temperature": sampling.temperature or 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if sampling.top_p is not None:
        fields["top_p"] = sampling.top_p
    if sampling.stop:
        fields["stop"] = list(sampling.stop)
    if sampling.seed is not None:
        fields["seed"] = sampling.seed
    if request.response_format is not None:
        fields["response_format"] = request.response_format  # vLLM constrains the answer itself
    return fields


def _vllm_error(response: httpx.Response) -> TuneloopError:
    """vLLM's refusal of a request as the error the app answers with: 400 for what the request asked."""
    try:
        return _stream_error({**response.json()["error"], "code": response.status_code})
    except (ValueError, KeyError, TypeError):
        return TuneloopError(f"vLLM answered HTTP {response.status_code}: {response.text.strip()[:500]}")


def _stream_error(error: dict[str, Any]) -> TuneloopError:
    """An error in vLLM's shape: {"message", "type", "param", "code" (the HTTP status)}."""
    if error.get("code") in (400, 422):
        return InvalidRequestError(error["message"], param=error.get("param"))
    return TuneloopError(f"vLLM answered HTTP {error.get('code')}: {error['message']}")


def _error_message(response: httpx.Response) -> str:
    """The message of vLLM's error body ({"error": {"message": ...}}), or the body itself."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text.strip()[:500]


def _port_taken(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _signal_group(pid: int, signum: signal.Signals) -> None:
    try:
        os.killpg(pid, signum)  # start_new_session made vLLM's pid its process group id
    except ProcessLookupError:
        pass  # the whole group is gone already
