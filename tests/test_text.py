"""Byte-level text: corpus splits, fingerprints, windows, passkey documents, bits per byte, passkey scores."""

import json
import re

import numpy as np
import pytest
import torch

from sparsa.cli import main
from sparsa.experiments.language import bits_per_byte, passkey_accuracy
from sparsa.models import Transformer, TransformerConfig
from sparsa.tasks import BOS, IGNORE, make_task, sample
from sparsa.tasks.text import FIRST_BYTE, Corpus, passkey_document, passkey_room, split_of


def _corpus(tmp_path, files):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(text)
    return Corpus(str(tmp_path))


def _text(example):
    return bytes((example.tokens[1:] - FIRST_BYTE).astype(np.uint8))


def test_files_are_split_by_their_path_alone(tmp_path):
    names = [f"pkg{i % 3}/module{i}.py" for i in range(60)]
    corpus = _corpus(tmp_path / "a", {n: b"x = 1\n" * (i + 1) for i, n in enumerate(names)})
    fewer = _corpus(tmp_path / "b", {n: b"y\n" for n in names[::2]})
    for name in names[::2]:
        assert split_of(name) in ("train", "validation", "test")
        assert any(np.array_equal(d, np.frombuffer((tmp_path / "a" / name).read_bytes(), np.uint8))
                   for d in corpus.documents[split_of(name)])  # fmt: skip
    counts = {split: len(docs) for split, docs in corpus.documents.items()}
    assert sum(counts.values()) == 60 and counts["train"] > counts["test"]
    assert {n: split_of(n) for n in fewer.files} == {n: split_of(n) for n in names[::2]}


def test_the_fingerprint_names_the_text_exactly(tmp_path):
    files = {"a.py": b"print(1)\n", "b/c.txt": b"hello\n"}
    first, same = _corpus(tmp_path / "1", files), _corpus(tmp_path / "2", files)
    changed = _corpus(tmp_path / "3", {**files, "a.py": b"print(2)\n"})
    renamed = _corpus(tmp_path / "4", {"z.py": files["a.py"], "b/c.txt": files["b/c.txt"]})
    assert first.fingerprint()["sha256"] == same.fingerprint()["sha256"]
    assert first.fingerprint()["sha256"] != changed.fingerprint()["sha256"]
    assert first.fingerprint()["sha256"] != renamed.fingerprint()["sha256"]
    assert first.fingerprint()["files"] == 2 and first.fingerprint()["bytes"] == 15


def test_the_default_corpus_is_the_standard_library_without_its_tests():
    corpus = Corpus("stdlib")
    record = corpus.fingerprint()
    assert record["python"] and record["files"] > 300 and record["bytes"] > 5_000_000
    assert not any(re.search(r"(^|/)(test|tests|idle_test)/", f) for f in corpus.files)
    assert all(f.endswith(".py") for f in corpus.files)


def test_a_single_file_is_split_by_position(tmp_path):
    corpus = _corpus(tmp_path, {"book.txt": bytes(range(256)) * 40})
    sizes = {split: sum(len(d) for d in docs) for split, docs in corpus.documents.items()}
    assert sizes == {"train": 9216, "validation": 512, "test": 512}


def test_windows_lie_inside_one_document_uniform_over_all_starts(tmp_path):
    test_names = [n for n in (f"doc{i}.txt" for i in range(200)) if split_of(n) == "test"][:2]
    documents = {test_names[0]: bytes(range(50)), test_names[1]: bytes(range(100, 160))}
    corpus = _corpus(tmp_path, {**documents, "other.txt": b"z" * 500})
    rng = np.random.default_rng(0)
    counts = {}
    for _ in range(2200):
        window = bytes(corpus.window(rng, "test", 45))
        (name,) = [n for n, text in documents.items() if window in text]
        key = (name, documents[name].index(window))
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 6 + 16 and min(counts.values()) > 50 and max(counts.values()) < 150
    first, second = (documents[name] for name in sorted(test_names))
    every = [first[i : i + 20] for i in range(0, len(first) - 19, 20)]
    every += [second[i : i + 20] for i in range(0, len(second) - 19, 20)]
    assert [bytes(w) for w in corpus.windows("test", 20)] == every
    assert [bytes(w) for w in corpus.windows("test", 20, 3)] == [every[0], every[2], every[4]]
    assert [bytes(w) for w in corpus.windows("test", 20, 9)] == every


def test_language_model_examples_label_every_next_byte():
    task = make_task("text")
    e = sample(task, 0, "validation", 64, 3)
    assert e.tokens[0] == BOS and len(e.tokens) == 65
    assert np.array_equal(e.labels[:-1], e.tokens[1:]) and e.labels[-1] == IGNORE
    again = sample(make_task("text"), 0, "validation", 64, 3)
    assert np.array_equal(e.tokens, again.tokens)
    assert not np.array_equal(sample(task, 0, "test", 64, 3).tokens, e.tokens)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("filler", ["classic", "corpus"])
def test_the_passkey_appears_once_at_its_depth_and_is_the_answer(depth, filler):
    task = make_task("text", filler=filler)
    rng = np.random.default_rng(7)
    for length in (200, 1000):
        example, key = task.passkey(rng, length, "test", depth)
        text = _text(example)
        assert len(text) == length
        stated = re.findall(rb"The pass key is (\d{5})\. Remember it\. (\d{5}) is the pass key\.", text)
        assert len(stated) == 1 and stated[0] == (key, key) and len(key) == 5
        asked = re.fullmatch(rb"(?s).*What is the pass key\? The pass key is (\d{5})", text)
        assert asked and asked.group(1) == key
        room = passkey_room(length)
        at = text.index(b" The pass key is")
        assert at == round(depth * room)
        labelled = example.labels != IGNORE
        assert labelled.sum() == 5
        assert bytes((example.labels[labelled] - FIRST_BYTE).astype(np.uint8)) == key


def test_a_share_of_training_examples_are_passkey_documents():
    task = make_task("text", passkey_share=0.5, filler="classic")
    texts = [_text(sample(task, 0, "train", 300, i)) for i in range(40)]
    passkeys = sum(b"What is the pass key?" in t for t in texts)
    assert 10 <= passkeys <= 30


def test_bad_corpora_and_lengths_are_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        make_task("text", corpus=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no non-empty file"):
        make_task("text", corpus=str(tmp_path / "empty"))
    (tmp_path / "small.txt").write_bytes(b"tiny text" * 20)
    task = make_task("text", corpus=str(tmp_path / "small.txt"))
    with pytest.raises(ValueError, match=r"no document of the test split .* holds 64 bytes"):
        sample(task, 0, "test", 64, 0)
    with pytest.raises(ValueError, match="filler"):
        make_task("text", filler="lorem")
    with pytest.raises(ValueError, match="passkey_share"):
        make_task("text", passkey_share=2)
    with pytest.raises(ValueError, match="at least"):
        passkey_document(np.random.default_rng(0), 40, 0.5, np.zeros(0, np.uint8))


def _tiny_model(task, seed=0):
    torch.manual_seed(seed)
    config = TransformerConfig(
        vocab_size=task.vocab_size, d_model=32, n_layers=2, n_heads=4, positions="nape"
    )
    return Transformer(config).eval()


def test_bits_per_byte_equal_the_cross_entropy_by_hand(tmp_path):
    corpus = _corpus(
        tmp_path, {"book.txt": bytes(np.random.default_rng(0).integers(32, 127, 4000).astype(np.uint8))}
    )
    task = make_task("text", corpus=str(tmp_path / "book.txt"))
    model = _tiny_model(task)
    result = bits_per_byte(model, task, 48, max_windows=3, batch_size=2)
    windows = corpus.windows("test", 48, 3)
    by_hand = []
    with torch.no_grad():
        for window in windows:
            target = torch.from_numpy(window.astype(np.int64) + FIRST_BYTE)
            tokens = torch.cat([torch.tensor([BOS]), target[:-1]])[None]
            logits = model(tokens)[0].double()
            by_hand.append(-logits.log_softmax(-1)[torch.arange(48), target] / np.log(2))
    by_hand = torch.stack(by_hand)
    assert result["windows"] == 3
    assert result["bits_per_byte"] == pytest.approx(float(by_hand.mean()), rel=1e-5)
    np.testing.assert_allclose(result["bits_by_position"], by_hand.mean(0).numpy(), rtol=1e-5)


class _Retriever(torch.nn.Module):
    """Reads the stated key from the prompt and predicts it; blind to keys stated before ``blind_before``."""

    def __init__(self, vocab, blind_before=0):
        super().__init__()
        self.vocab, self.blind_before = vocab, blind_before
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens, logits_to_keep=None):
        logits = torch.zeros(*tokens.shape, self.vocab)
        for row, ids in enumerate(tokens):
            text = bytes((ids[1:] - FIRST_BYTE).clamp(0, 255).to(torch.uint8).tolist())
            found = re.search(rb"The pass key is (\d{5})\. Remember", text)
            if found.start() < self.blind_before:
                continue
            for i, digit in enumerate(found.group(1)):
                logits[row, len(ids) - 6 + i, FIRST_BYTE + digit] = 1.0
        return logits if logits_to_keep is None else logits[:, -logits_to_keep:]


def test_passkey_accuracy_is_exact_match_of_the_key_per_depth():
    task = make_task("text", filler="classic")
    perfect = passkey_accuracy(_Retriever(task.vocab_size), task, 400, trials=6)
    assert perfect["passkey_exact_match"] == {
        "0": 100.0,
        "0.25": 100.0,
        "0.5": 100.0,
        "0.75": 100.0,
        "1": 100.0,
    }
    half = passkey_accuracy(_Retriever(task.vocab_size, blind_before=120), task, 400, trials=6)
    assert half["passkey_exact_match"] == {"0": 0.0, "0.25": 0.0, "0.5": 100.0, "0.75": 100.0, "1": 100.0}
    assert passkey_accuracy(_tiny_model(task), task, 300, trials=4)["passkey_exact_match"]["0.5"] == 0.0


def test_train_and_eval_on_a_corpus_folder_end_to_end(tmp_path, capsys):
    rng = np.random.default_rng(1)
    for i in range(30):
        (tmp_path / "corpus" / f"f{i}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "corpus" / f"f{i}.txt").write_bytes(bytes(rng.integers(97, 123, 600).astype(np.uint8)))
    corpus = ["--task-option", f"corpus={tmp_path / 'corpus'}", "--task-option", "filler=classic"]
    run = tmp_path / "run"
    options = ["--min-length", "128", "--max-length", "128", "--val-length", "128", "--steps", "4"]
    options += [
        "--batch-size",
        "2",
        "--eval-every",
        "2",
        "--d-model",
        "32",
        "--n-layers",
        "1",
        "--n-heads",
        "2",
    ]
    assert main(["train", "--task", "text", *corpus, *options, "--out", str(run), "--quiet"]) == 0
    assert (
        main(["eval", str(run), "--lengths", "128", "256", "--examples", "3", "--out", str(tmp_path / "ev")])
        == 0
    )
    record = json.loads((tmp_path / "ev" / "results.json").read_text())
    rows = {row["length"]: row for row in record["results"]}
    assert set(rows) == {128, 256}
    assert all(
        0 < row["bits_per_byte"] < 10 and len(row["bits_by_position"]) == row["length"]
        for row in rows.values()
    )
    assert set(rows[256]["passkey_by_depth"]) == {"0", "0.25", "0.5", "0.75", "1"}
    assert record["corpus"] == Corpus(str(tmp_path / "corpus")).fingerprint()
    assert record["corpus"]["files"] == 30
    table = (tmp_path / "ev" / "table.md").read_text()
    assert "bits per byte" in table and f"sha256 {record['corpus']['sha256'][:16]}" in table
    assert (tmp_path / "ev" / "passkey.png").exists() and (tmp_path / "ev" / "bits_by_position.png").exists()
    assert "bits per byte" in capsys.readouterr().out
