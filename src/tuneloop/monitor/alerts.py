"""Alert rules over the per-version figures of a window, and the webhook they are sent to."""

from __future__ import annotations

from typing import Any

from tuneloop.config import AlertRule


def fired(rule: AlertRule, versions: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """An alert per version whose figure for `rule.metric` crosses the rule's bound over its window; a
    version with fewer than `rule.min_requests` requests there, or without the figure, stays quiet."""
    alerts = []
    for version, stats in versions.items():
        value = stats.get(rule.metric)
        # A volume rule speaks exactly when traffic is thin; the others wait for enough requests.
        if value is None or (rule.metric != "volume" and stats["volume"] < rule.min_requests):
            continue
        if (rule.below is not None and value < rule.below) or (rule.above is not None and value > rule.above):
            bound = f"below {rule.below:g}" if rule.below is not None else f"above {rule.above:g}"
            alerts.append({
                "metric": rule.metric, "version": version, "value": value, "window": rule.window,
                "requests": stats["volume"],
                "message": f"{version}: {rule.metric} {value:.4g} is {bound} over the last {rule.window}",
            })
    return alerts


def drift_alerts(versions: dict[str, dict[str, Any]], window: str) -> list[dict[str, Any]]:
    """An alert per version whose live prompts drifted from the held-out prompts."""
    alerts = []
    for version, stats in versions.items():
        drift = stats.get("drift")
        if drift is None or not drift["drifted"]:
            continue
        views = [name for name, key in (("embeddings", "embedding_drifted"), ("lengths", "length_drifted"))
                 if drift[key]]
        alerts.append({
            "metric": "input_drift", "version": version, "value": stats["drift_p_value"], "window": window,
            "requests": stats["volume"],
            "message": f"{version}: live prompts drifted from the held-out prompts ({' and '.join(views)}; "
                       f"false-alarm rate {drift['alpha']:g})",
        })
    return alerts


def post_webhook(url: str, payload: dict[str, Any]) -> str | None:
    """POST the alerts as JSON; returns why it failed, or None."""
    import httpx

    try:
        response = httpx.post(url, json=payload, timeout=10)
        response.raise_for_status()
    except (httpx.HTTPError, httpx.InvalidURL) as err:
        return f"webhook {url}: {err}"
    return None
