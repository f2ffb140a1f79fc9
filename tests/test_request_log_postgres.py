"""The request log on PostgreSQL, as several servers share it: two writers, feedback across them, `monitor`
reading it. Runs where PostgreSQL's server binaries (Debian's `postgresql` package) and psycopg are
installed; skipped elsewhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tuneloop.config import AlertRule, MonitorConfig
from tuneloop.monitor import monitor, training_profile
from tuneloop.serve.request_log import RequestLog, RequestRecord, connect, read_feedback, read_requests


def _server_binaries() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    installed = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return installed[-1].parent if installed else None


@pytest.fixture(scope="module")
def postgres_url():
    pytest.importorskip("psycopg", reason="needs psycopg (pip install 'psycopg[binary]')")
    binaries = _server_binaries()
    if binaries is None:
        pytest.skip("needs PostgreSQL's server binaries (initdb, pg_ctl)")
    # PostgreSQL refuses to run as root: there, the cluster belongs to the `postgres` user.
    as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="tuneloop-pg-"))
    root.chmod(0o777)
    data = root / "data"
    subprocess.run([*as_owner, str(binaries / "initdb"), "-D", str(data), "-U", "tuneloop", "--auth=trust"],
                   check=True, capture_output=True)
    options = f"-k {root} -c listen_addresses=''"
    # The server's output goes to a file: a pipe would be held open by it and never reach its end.
    subprocess.run([*as_owner, str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"),
                    "-w", "start"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"postgresql+psycopg://tuneloop@/postgres?host={root}"
    finally:
        subprocess.run([*as_owner, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(root, ignore_errors=True)


def record(i: int, server: str) -> RequestRecord:
    return RequestRecord(id=f"chatcmpl-{server}-{i}", created=time.time(), project="team-a", model="triage",
                         version="triage-v1", prompt=[{"role": "user", "content": f"ticket {i}: call +1 415 555 0142"}],
                         answer="not json", status=200, latency_ms=10.0 * (i + 1), prompt_tokens=5,
                         completion_tokens=3)


def test_two_servers_share_one_log_on_postgresql(postgres_url, tmp_path):
    servers = {name: RequestLog(postgres_url) for name in ("a", "b")}
    for name, request_log in servers.items():
        request_log.start()
        for i in range(5):
            request_log.record(record(i, name))
    servers["a"].flush()
    servers["b"].flush()

    stored = servers["a"].add_feedback("chatcmpl-b-3", "team-a", "bad", correction='{"category": "bug"}')
    for request_log in servers.values():
        request_log.close()

    database = connect(postgres_url)
    rows = read_requests(database, since=0)
    assert sorted(r["id"] for r in rows) == sorted(f"chatcmpl-{s}-{i}" for s in "ab" for i in range(5))
    assert all(r["prompt"][0]["content"].endswith("call [PHONE]") for r in rows)  # redacted before writing
    (feedback,) = read_feedback(database)
    assert feedback["id"] == stored["id"] and feedback["completion_id"] == "chatcmpl-b-3"
    assert feedback["prompt"] == [{"role": "user", "content": "ticket 3: call [PHONE]"}]

    chats = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "{}"}]] * 5
    schema = {"type": "object", "required": ["category"]}
    cfg = MonitorConfig(alerts=[AlertRule(metric="schema_valid", below=0.95, window="1h")])
    report = monitor(cfg, postgres_url, training_profile(chats, chats, schema), {"triage-v1": schema}, tmp_path, "1h")
    assert report.versions["triage-v1"]["volume"] == 10 and report.versions["triage-v1"]["schema_valid"] == 0.0
    assert [a["metric"] for a in report.alerts] == ["schema_valid"]
