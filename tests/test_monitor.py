"""`tuneloop monitor`: per-version figures over a window of the request log, compared with the training
data, alert rules with their own windows, a webhook, the HTML report and the exit code cron sees."""

from __future__ import annotations

import json
import time

import pytest
from fastapi import FastAPI, Request

from tests.conftest import TICKETS
from tuneloop.config import AlertRule, MonitorConfig
from tuneloop.monitor import monitor, training_profile
from tuneloop.serve.request_log import RequestLog, RequestRecord

ROWS = [json.loads(line)["messages"] for line in TICKETS.read_text().splitlines()]
SCHEMA = json.loads((TICKETS.parent / "schema.json").read_text())
GERMAN = [f"Hallo, die App stürzt seit dem Update ab, wenn ich Rechnung Nummer {i} öffnen will. Was kann ich tun?"
          for i in range(40)]


def write_log(url: str, rows: list[dict]) -> None:
    request_log = RequestLog(url)
    request_log.start()
    for i, row in enumerate(rows):
        defaults = {"id": f"r{i}", "created": time.time() - 60, "project": None, "model": row["version"],
                    "status": 200, "finish_reason": "stop", "latency_ms": 100.0 + i, "prompt_tokens": 10,
                    "completion_tokens": 5}
        request_log.record(RequestRecord(**{**defaults, **row}))
    request_log.close()


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def profile():
    return training_profile(ROWS[:300], ROWS[300:400], SCHEMA)


def test_figures_per_version_against_the_training_data(tmp_path, profile):
    url = f"sqlite:///{tmp_path / 'log.db'}"
    good = [{"version": "triage-v1", "prompt": m[:-1], "answer": m[-1]["content"]} for m in ROWS[400:430]]
    bad = [{"version": "triage-v2", "prompt": user(text), "answer": "I'm sorry, but I can't help with that."}
           for text in GERMAN]
    failed = [{"version": "triage-v2", "prompt": user("x"), "answer": None, "status": 500, "finish_reason": None}]
    old = [{"version": "triage-v1", "prompt": user("old"), "answer": "{}", "created": time.time() - 7200}]
    write_log(url, good + bad + failed + old)
    cfg = MonitorConfig(alerts=[AlertRule(metric="schema_valid", below=0.95, window="1h"),
                                AlertRule(metric="error_rate", above=0.5, window="1h")])

    report = monitor(cfg, url, profile, {"triage-v1": SCHEMA, "triage-v2": SCHEMA}, tmp_path / "monitor", "1h")

    v1, v2 = report.versions["triage-v1"], report.versions["triage-v2"]
    assert v1["volume"] == 30 and v2["volume"] == 41  # the row from two hours ago is outside the window
    assert v1["schema_valid"] == 1.0 and v1["refusal_share"] == 0.0 and v1["error_rate"] == 0.0
    assert v2["schema_valid"] == 0.0 and v2["refusal_share"] == 1.0 and v2["error_rate"] == pytest.approx(1 / 41)
    assert v1["latency_p50_ms"] == pytest.approx(114.5) and v1["prompt_tokens"] == 300
    assert v1["labels"]["category"]["p_value"] > 0.01  # live categories look like training's
    assert v2["labels"]["category"]["live"]["(none)"] == 1.0  # no answer had a category
    assert v1["prompt_length"]["p_value"] > 0.01 and v2["prompt_length"]["p_value"] < 0.01
    assert not v1["drift"]["drifted"] and v2["drift"]["drifted"] and v2["drift"]["embedding_drifted"]
    fired = {(a["version"], a["metric"]) for a in report.alerts}
    assert fired == {("triage-v2", "schema_valid"), ("triage-v2", "input_drift")}
    html = report.html.read_text()
    assert html.count("<img") == 2 and "triage-v2: schema_valid 0 is below 0.95 over the last 1h" in html
    saved = json.loads((tmp_path / "monitor" / "meta.json").read_text())
    assert saved["versions"]["triage-v1"]["volume"] == 30 and "live" not in saved["versions"]["triage-v1"]["prompt_length"]


def test_a_rule_looks_over_its_own_window(tmp_path, profile):
    url = f"sqlite:///{tmp_path / 'log.db'}"
    write_log(url, [{"version": "v", "prompt": user("hi"), "answer": "not json", "created": time.time() - 3 * 3600}])
    rule = AlertRule(metric="schema_valid", below=0.95, window="1h")
    assert monitor(MonitorConfig(alerts=[rule]), url, profile, {"v": SCHEMA}, tmp_path / "m", "24h").alerts == []
    day = rule.model_copy(update={"window": "24h"})
    (alert,) = monitor(MonitorConfig(alerts=[day]), url, profile, {"v": SCHEMA}, tmp_path / "m", "24h").alerts
    assert alert["version"] == "v" and alert["value"] == 0.0 and alert["requests"] == 1


def test_cli_posts_alerts_to_the_webhook_and_exits_4(prepared_project, tiny_model_dir, tmp_path, serve_app):
    received = []
    hook = FastAPI()

    @hook.post("/hook")
    async def take(request: Request):
        received.append(await request.json())
        return {}

    hook_url = serve_app(hook).removesuffix("/v1") + "/hook"
    cli = prepared_project(f"""
name: t
base_model: {tiny_model_dir}
data:
  path: data.jsonl
monitor:
  alerts: [{{metric: latency_p95_ms, above: 1000, window: 1h}}]
  webhook_url: {hook_url}
""")
    url = f"sqlite:///{(tmp_path / 'runs' / 't' / 'requests.db').resolve()}"
    write_log(url, [{"version": "t-v1", "prompt": user("hi"), "answer": "ok", "latency_ms": 5000.0}])

    result = cli("monitor", "config.yaml", "--since", "2h")

    assert result.exit_code == 4, result.output
    assert "t-v1: latency_p95_ms 5000 is above 1000 over the last 1h" in result.output
    (payload,) = received
    assert payload["alerts"][0]["metric"] == "latency_p95_ms" and payload["window"] == "2h"
    assert (tmp_path / "runs" / "t" / "monitor" / "monitor_report.html").is_file()


def test_only_the_configs_model_is_looked_at_and_its_serving_version_even_without_traffic(tmp_path, profile):
    url = f"sqlite:///{tmp_path / 'log.db'}"
    write_log(url, [{"version": "triage-v1", "prompt": user("hi"), "answer": "{}"},
                    {"version": "other-v1", "prompt": user("hi"), "answer": "{}"},
                    {"version": "smollm2-135m-instruct", "prompt": user("hi"), "answer": "hello"}])
    cfg = MonitorConfig(alerts=[AlertRule(metric="volume", below=1, window="1h")])

    report = monitor(cfg, url, profile, {}, tmp_path / "m", "1h", model="triage", expected=("triage-v2",))

    assert set(report.versions) == {"triage-v1", "triage-v2"}
    assert report.versions["triage-v2"]["volume"] == 0 and report.versions["triage-v2"]["latency_p95_ms"] is None
    assert [(a["version"], a["metric"]) for a in report.alerts] == [("triage-v2", "volume")]  # the traffic stopped
    assert "got 100 held-out and 1 live" in report.versions["triage-v1"]["drift"]["reason"]
