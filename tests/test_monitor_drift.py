"""Input drift on realistic support-ticket prompts: the stated false-alarm rate holds when nothing
changed, and a 30 % share of another language or of 3x longer prompts is caught."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy.stats import ks_2samp

from tuneloop.monitor.drift import MIN_PROMPTS, input_drift, prompt_embeddings, prompt_length

ALPHA = 0.05  # the overall false-alarm rate promised to users
SEEDS = 200
WINDOW = 200  # live prompts per drift check
SHARE = 0.3  # share of a drifted window replaced by the other kind of prompt
REFERENCE_SIZE = 300

PRODUCTS = [
    "the mobile app", "my router", "the billing portal", "the desktop client", "my smart thermostat",
    "the web dashboard", "the printer driver", "my account", "the payment page", "the sync service",
    "the VPN client", "my wireless earbuds", "the checkout page", "the calendar integration", "my e-reader",
]
PROBLEMS = [
    "keeps crashing on startup", "won't accept my password", "charged me twice this month",
    "stopped syncing my files", "shows a blank screen", "is extremely slow", "disconnects every few minutes",
    "sends me duplicate emails", "lost all my saved settings", "won't let me cancel my subscription",
    "shows the wrong currency", "refuses to update", "drains the battery quickly", "logs me out constantly",
    "gives me an error 500",
]
CONTEXTS = [
    "since yesterday", "after the latest update", "on my new laptop", "every morning", "when I use Wi-Fi",
    "since I changed my plan", "on two different phones", "for about a week", "right after I log in",
    "whenever I travel",
]
SHAPES = [
    "Hi, {p} {x} {c}. Can you help?",
    "{P} {x} {c}. What should I do?",
    "I need help: {p} {x} {c}.",
    "Hello support team, {p} {x} {c}. I already tried restarting it. Any ideas?",
    "Is there a fix? {P} {x} {c}.",
    "Quick question: {p} {x} {c}, is this a known issue?",
    "{P} {x} {c} and I am getting frustrated. Please advise.",
]
GERMAN_PRODUCTS = [
    "die mobile App", "mein Router", "das Abrechnungsportal", "der Desktop-Client", "mein Thermostat",
    "das Web-Dashboard", "der Druckertreiber", "mein Konto", "die Zahlungsseite", "der Synchronisierungsdienst",
]
GERMAN_PROBLEMS = [
    "stürzt beim Start ständig ab", "akzeptiert mein Passwort nicht", "hat mich diesen Monat doppelt belastet",
    "synchronisiert meine Dateien nicht mehr", "zeigt nur einen leeren Bildschirm", "ist extrem langsam",
    "trennt alle paar Minuten die Verbindung", "hat alle meine Einstellungen verloren",
    "lässt mich mein Abo nicht kündigen", "meldet mich ständig ab",
]
GERMAN_CONTEXTS = [
    "seit gestern", "nach dem letzten Update", "auf meinem neuen Laptop", "jeden Morgen", "im WLAN",
    "seit einer Woche", "direkt nach der Anmeldung",
]
GERMAN_SHAPES = [
    "Hallo, {p} {x} {c}. Können Sie mir helfen?",
    "{P} {x} {c}. Was soll ich tun?",
    "Ich brauche Hilfe: {p} {x} {c}.",
    "Guten Tag, {p} {x} {c}. Ich habe es schon neu gestartet. Haben Sie eine Idee?",
    "Gibt es eine Lösung? {P} {x} {c}.",
]
DETAILS = [
    "I am on version 4.2 of the software, running on Windows 11 with all updates installed.",
    "I have already restarted the device twice and cleared the cache, but nothing changed.",
    "My order number should be in my account history if you need to look it up.",
    "This is affecting my whole team, so we cannot finish our work until it is fixed.",
    "I contacted support last week about something similar and was told it had been resolved.",
    "The problem happens both at home and at the office, on different networks.",
    "I attached a screenshot of the error message to my previous email for reference.",
    "Before this started everything had been working fine for more than a year.",
    "I would appreciate a call back, since email replies have been taking several days.",
    "I also tried reinstalling from scratch, following the steps in your help center article.",
]


def _prompts(n: int, seed: int, products, problems, contexts, shapes) -> list[str]:
    """`n` distinct prompts drawn from the templates."""
    rng = random.Random(seed)
    prompts: set[str] = set()
    while len(prompts) < n:
        p, x, c, shape = rng.choice(products), rng.choice(problems), rng.choice(contexts), rng.choice(shapes)
        prompts.add(shape.format(p=p, P=p[0].upper() + p[1:], x=x, c=c))
    return sorted(prompts)


def _three_times_longer(prompt: str, rng: random.Random) -> str:
    """`prompt` followed by detail sentences, as close to three times its length as they allow."""
    details, longer, target = rng.sample(DETAILS, len(DETAILS)), prompt, 3 * len(prompt)
    while abs(len(longer) + 1 + len(details[-1]) - target) < abs(len(longer) - target):
        longer += " " + details.pop()
    return longer


@pytest.fixture(scope="module")
def pools() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Embeddings and lengths, computed once, of the English pool and of the two kinds of drift."""
    pytest.importorskip("sentence_transformers")
    rng = random.Random(0)
    texts = {
        "english": _prompts(800, 1, PRODUCTS, PROBLEMS, CONTEXTS, SHAPES),
        "german": _prompts(120, 2, GERMAN_PRODUCTS, GERMAN_PROBLEMS, GERMAN_CONTEXTS, GERMAN_SHAPES),
        "longer": [_three_times_longer(p, rng) for p in _prompts(120, 3, PRODUCTS, PROBLEMS, CONTEXTS, SHAPES)],
    }
    embeddings = prompt_embeddings([t for group in texts.values() for t in group])  # (N, 384)
    out, start = {}, 0
    for name, group in texts.items():
        lengths = np.array([prompt_length(t) for t in group], dtype=float)
        out[name] = (embeddings[start : start + len(group)], lengths)
        start += len(group)
    return out


def _drift_rate(pools, drift: str | None) -> tuple[float, dict[str, float]]:
    """Share of seeds whose window is called drifted, and how often each view fired."""
    english_emb, english_len = pools["english"]
    replaced = round(SHARE * WINDOW) if drift else 0
    drifted, fired = 0, {"embeddings": 0, "lengths": 0}
    for seed in range(SEEDS):
        rng = np.random.default_rng(seed)
        # A fresh held-out set per seed as well as a fresh window: alpha bounds one check over both
        # samples, while windows checked against one fixed reference all share that reference's luck.
        drawn = rng.permutation(len(english_emb))[: REFERENCE_SIZE + WINDOW - replaced]
        ref, live = drawn[:REFERENCE_SIZE], drawn[REFERENCE_SIZE:]
        emb, lengths = english_emb[live], english_len[live]
        if drift:
            other_emb, other_len = pools[drift]
            swap = rng.choice(len(other_emb), replaced, replace=False)
            emb, lengths = np.concatenate([emb, other_emb[swap]]), np.concatenate([lengths, other_len[swap]])
        result = input_drift(english_emb[ref], emb, english_len[ref], lengths, alpha=ALPHA)
        drifted += result.drifted
        fired["embeddings"] += result.embedding_drifted
        fired["lengths"] += result.length_drifted
    return drifted / SEEDS, {view: n / SEEDS for view, n in fired.items()}


def test_no_drift_keeps_the_stated_false_alarm_rate(pools):
    rate, fired = _drift_rate(pools, None)
    bound = ALPHA + 2 * math.sqrt(ALPHA * (1 - ALPHA) / SEEDS)
    print(f"false alarms: {rate:.3f} (bound {bound:.3f}), by view {fired}")
    assert rate <= bound, f"false-alarm rate {rate:.3f} over {SEEDS} seeds exceeds {bound:.3f}"


@pytest.mark.parametrize("drift", ["german", "longer"])
def test_a_30_percent_shift_is_detected(pools, drift):
    rate, fired = _drift_rate(pools, drift)
    print(f"{drift}: detected {rate:.3f}, by view {fired}")
    assert rate >= 0.9, f"{drift} prompts at {SHARE:.0%} detected in only {rate:.1%} of {SEEDS} seeds"


def test_too_few_prompts_is_not_tested():
    rng = np.random.default_rng(0)
    reference, live = rng.normal(size=(100, 8)), rng.normal(size=(MIN_PROMPTS - 1, 8)) + 5
    result = input_drift(reference, live, [50.0] * 100, [500.0] * (MIN_PROMPTS - 1), alpha=ALPHA)
    assert not result.drifted
    assert math.isnan(result.embedding_p_value) and math.isnan(result.length_p_value)
    assert result.reason and "at least" in result.reason
    assert (result.reference_size, result.live_size, result.live_median_length) == (100, MIN_PROMPTS - 1, 500.0)


def test_identical_inputs_are_not_drifted():
    rng = np.random.default_rng(0)
    embeddings, lengths = rng.normal(size=(50, 8)), rng.integers(20, 200, size=50).tolist()
    result = input_drift(embeddings, embeddings, lengths, lengths, alpha=ALPHA)
    assert not result.drifted and result.reason is None
    assert result.embedding_p_value == 1.0 and result.length_p_value == 1.0


def test_embedding_p_value_matches_scipy_over_every_dimension():
    rng = np.random.default_rng(0)
    # Rounding makes ties, which the one-pass KS statistics must handle as scipy does.
    reference, live = rng.normal(size=(60, 16)).round(1), rng.normal(size=(45, 16)).round(1)
    live[:, 3] += 0.8
    expected = min(1.0, ks_2samp(reference, live, axis=0).pvalue.min() * 16)
    result = input_drift(reference, live, [1.0] * 60, [1.0] * 45, alpha=ALPHA)
    assert result.embedding_p_value == pytest.approx(expected, rel=1e-12)
    assert result.embedding_drifted and result.drifted


def test_mismatched_inputs_are_rejected():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="same D"):
        input_drift(rng.normal(size=(30, 8)), rng.normal(size=(30, 4)), [1.0] * 30, [1.0] * 30, alpha=ALPHA)
    with pytest.raises(ValueError, match="one length per"):
        input_drift(rng.normal(size=(30, 8)), rng.normal(size=(30, 8)), [1.0] * 29, [1.0] * 30, alpha=ALPHA)
    with pytest.raises(ValueError, match="alpha"):
        input_drift(rng.normal(size=(30, 8)), rng.normal(size=(30, 8)), [1.0] * 30, [1.0] * 30, alpha=1.5)
