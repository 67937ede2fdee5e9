"""Byte-level text: next-byte prediction on a corpus, and passkey retrieval documents.

The default corpus is the Python standard library of the running interpreter
(its ``.py`` files without the test suites: present on every machine). Files
are assigned to the train, validation and test splits by a hash of their
relative path, so the split does not depend on the file order or on which
other files exist; a corpus of a single file is split by position (the first
90% train, then 5% validation, 5% test). A window of a split lies inside one
file, drawn uniformly over all windows of its length.

Tokens are the 256 byte values after the special tokens. A passkey document
(Mohtashami and Jaggi's format, in bytes) states a 5-digit key once at a
given depth of filler text and ends with the question and the key.
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

import numpy as np

from .base import BOS, IGNORE, SPLITS, Example, Task, register

FIRST_BYTE = 4
"""Token id of byte 0: the bytes follow the special tokens."""

SPLIT_SHARES = {"train": 90, "validation": 5, "test": 5}
"""Percent of the files (or, for one file, of its bytes) in each split."""

TEST_FOLDERS = {"test", "tests", "idle_test", "__pycache__", "site-packages"}

CLASSIC_FILLER = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = b" The pass key is %s. Remember it. %s is the pass key. "
QUESTION = b" What is the pass key? The pass key is "
KEY_DIGITS = 5
FILLERS = ("classic", "corpus")


def split_of(relative: str) -> str:
    """The split of a file, from the sha256 of its relative path."""
    bucket = int(hashlib.sha256(relative.encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


class Corpus:
    """The documents of a corpus, split into train, validation and test, with a fingerprint."""

    def __init__(self, source: str = "stdlib") -> None:
        self.source = source
        if source == "stdlib":
            self.root = Path(sysconfig.get_paths()["stdlib"])
            files = [
                p
                for p in self.root.rglob("*.py")
                if not TEST_FOLDERS & set(p.relative_to(self.root).parts[:-1])
                and not p.name.startswith("test_")
            ]
        else:
            path = Path(source)
            if not path.exists():
                raise ValueError(f"corpus {source!r} does not exist")
            self.root = path if path.is_dir() else path.parent
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        self.files = sorted(str(p.relative_to(self.root)) for p in files if p.stat().st_size > 0)
        if not self.files:
            raise ValueError(f"corpus {source!r} holds no non-empty file")

    @cached_property
    def documents(self) -> dict[str, list[np.ndarray]]:
        """Each split's documents as arrays of bytes."""
        documents = {split: [] for split in SPLIT_SHARES}
        if len(self.files) == 1:
            data = np.frombuffer((self.root / self.files[0]).read_bytes(), dtype=np.uint8)
            ends = np.cumsum([0, *SPLIT_SHARES.values()]) * len(data) // 100
            for split, start, end in zip(SPLIT_SHARES, ends[:-1], ends[1:], strict=True):
                documents[split].append(data[start:end])
            return documents
        for relative in self.files:
            data = np.frombuffer((self.root / relative).read_bytes(), dtype=np.uint8)
            documents[split_of(relative)].append(data)
        return documents

    def fingerprint(self) -> dict:
        """Which text this is: source, Python version (stdlib), files, bytes, sha256 of names and contents."""
        digest = hashlib.sha256()
        total = 0
        for relative in self.files:
            content = (self.root / relative).read_bytes()
            total += len(content)
            digest.update(relative.encode() + b"\0" + hashlib.sha256(content).digest())
        record = {
            "source": self.source,
            "files": len(self.files),
            "bytes": total,
            "sha256": digest.hexdigest(),
        }
        if self.source == "stdlib":
            record["python"] = platform.python_version()
        return record

    def window(self, rng: np.random.Generator, split: str, length: int) -> np.ndarray:
        """``length`` consecutive bytes of one document of ``split``, uniform over all such windows."""
        documents = self.documents[split]
        starts = np.array([max(0, len(d) - length + 1) for d in documents])
        if not starts.sum():
            longest = max((len(d) for d in documents), default=0)
            raise ValueError(
                f"no document of the {split} split of corpus {self.source!r} holds {length} bytes "
                f"(the longest holds {longest})"
            )
        index = int(rng.integers(0, starts.sum()))
        document = int(np.searchsorted(np.cumsum(starts), index, side="right"))
        start = index - int(starts[:document].sum())
        return documents[document][start : start + length]

    def windows(self, split: str, length: int, count: int | None = None) -> list[np.ndarray]:
        """Non-overlapping windows of ``length`` bytes, document by document, in file order.

        With ``count``, that many of them (or all, if fewer) evenly spaced over
        the whole split, so a capped evaluation still samples every part of it.
        """
        every = [
            document[start : start + length]
            for document in self.documents[split]
            for start in range(0, len(document) - length + 1, length)
        ]
        if count is None or count >= len(every):
            return every
        return [every[i] for i in np.linspace(0, len(every) - 1, count).round().astype(int)]


@cache
def load_corpus(source: str) -> Corpus:
    return Corpus(source)


def passkey_document(
    rng: np.random.Generator, length: int, depth: float, filler: np.ndarray
) -> tuple[np.ndarray, bytes]:
    """``length`` bytes: ``filler`` with the needle at ``depth`` (0 = start, 1 = end), the question, the key.

    ``filler`` must hold at least the bytes left after the needle, question and key.
    """
    key = str(int(rng.integers(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS))).encode()
    needle = np.frombuffer(NEEDLE % (key, key), dtype=np.uint8)
    tail = np.frombuffer(QUESTION + key, dtype=np.uint8)
    room = passkey_room(length)
    if room < 0:
        raise ValueError(f"a passkey document needs at least {length - room} bytes, got {length}")
    at = round(depth * room)
    document = np.concatenate((filler[:at], needle, filler[at:room], tail))
    return document, key


def passkey_room(length: int) -> int:
    """Bytes of filler in a passkey document of ``length`` bytes."""
    return length - len(NEEDLE % ((b"0" * KEY_DIGITS,) * 2)) - len(QUESTION) - KEY_DIGITS


@register
@dataclass(frozen=True)
class Text(Task):
    """Next-byte prediction on windows of ``length`` bytes of ``corpus`` ("stdlib" or a path).

    A share ``passkey_share`` of the examples are passkey documents of the
    same length, their filler ``filler`` ("corpus": text of the same split,
    "classic": the repeated sentences) and the needle at a uniform depth.
    The loss is on every next byte.
    """

    name = "text"
    kind = "classify"
    corpus: str = "stdlib"
    passkey_share: float = 0.0
    filler: str = "corpus"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.passkey_share <= 1:
            raise ValueError(f"text: passkey_share must lie in [0, 1], got {self.passkey_share}")
        if self.filler not in FILLERS:
            raise ValueError(f"text: filler must be one of {FILLERS}, got {self.filler!r}")
        load_corpus(self.corpus)

    @property
    def symbols(self) -> tuple[str, ...]:
        return tuple(f"x{b:02x}" for b in range(256))

    def check_length(self, length: int) -> None:
        if length < 2:
            raise ValueError(f"text: length must be >= 2 bytes, got {length}")

    def filler_bytes(self, rng: np.random.Generator, split: str, room: int) -> np.ndarray:
        if self.filler == "classic":
            repeats = -(-room // len(CLASSIC_FILLER))
            return np.frombuffer(CLASSIC_FILLER * max(1, repeats), dtype=np.uint8)[:room]
        return load_corpus(self.corpus).window(rng, split, room)

    def passkey(
        self, rng: np.random.Generator, length: int, split: str, depth: float
    ) -> tuple[Example, bytes]:
        """A passkey document of ``length`` bytes, labelled on the key's digits only, and the key."""
        document, key = passkey_document(
            rng, length, depth, self.filler_bytes(rng, split, passkey_room(length))
        )
        tokens = np.concatenate(([BOS], FIRST_BYTE + document.astype(np.int64)))
        labels = np.full(len(tokens), IGNORE, dtype=np.int64)
        labels[-KEY_DIGITS - 1 : -1] = tokens[-KEY_DIGITS:]
        return Example(tokens, labels, prompt=len(tokens) - KEY_DIGITS), key

    def example(self, rng: np.random.Generator, length: int, split: str = "train") -> Example:
        """``length`` bytes after BOS, each labelled with the next byte (the last one's is ignored)."""
        self.check_length(length)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        split = "train" if split == "export" else split
        if self.passkey_share and rng.random() < self.passkey_share:
            document, _ = passkey_document(
                rng, length, float(rng.random()), self.filler_bytes(rng, split, passkey_room(length))
            )
        else:
            document = load_corpus(self.corpus).window(rng, split, length)
        tokens = np.concatenate(([BOS], FIRST_BYTE + document.astype(np.int64)))
        labels = np.append(tokens[1:], IGNORE)
        return Example(tokens, labels, prompt=len(tokens))
