"""Task generators: determinism, format, and answers checked independently of the generators."""

import subprocess
import sys

import numpy as np
import pytest

from sparsa.tasks import BOS, EOS, IGNORE, SEP, TASKS, make_task, sample

SMALL = {"mqmtar": {"alphabet": 16, "n_keys": 200, "n_values": 200}}


def _task(name):
    return make_task(name, **SMALL.get(name, {}))


def _length(name):
    return 48 if name != "flipflop" else 40


@pytest.mark.parametrize("name", sorted(TASKS))
def test_examples_are_deterministic_and_independent_of_order(name):
    task = _task(name)
    first = [sample(task, 5, "train", _length(name), i) for i in range(4)]
    again = [sample(task, 5, "train", _length(name), i) for i in reversed(range(4))][::-1]
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.labels, b.labels)
    other = sample(task, 6, "train", _length(name), 0)
    test = sample(task, 5, "test", _length(name), 0)
    assert not np.array_equal(first[0].tokens, other.tokens) or not np.array_equal(
        first[0].tokens, test.tokens
    )


def test_examples_are_identical_in_another_process():
    code = (
        "from sparsa.tasks import make_task, sample;"
        "t = make_task('mqmtar', alphabet=16, n_keys=200, n_values=200);"
        "print(sample(t, 3, 'test', 60, 7).tokens.tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    here = sample(make_task("mqmtar", alphabet=16, n_keys=200, n_values=200), 3, "test", 60, 7)
    assert out.strip() == str(here.tokens.tolist())


@pytest.mark.parametrize("name", sorted(TASKS))
def test_format_tokens_in_vocabulary_and_labels_aligned(name):
    task = _task(name)
    for i in range(20):
        e = sample(task, 0, "test", _length(name), i)
        assert e.tokens[0] == BOS and e.tokens.min() >= 0 and e.tokens.max() < task.vocab_size
        assert len(e.labels) == len(e.tokens)
        labelled = e.labels != IGNORE
        assert labelled.any() and e.labels[labelled].max() < task.vocab_size
        if task.kind == "generate":
            assert e.tokens[e.prompt - 1] == SEP and e.tokens[-1] == EOS
            # Each label is the next token, on the answer positions only.
            assert np.array_equal(e.labels[e.prompt - 1 : -1], e.tokens[e.prompt :])
            assert (e.labels[: e.prompt - 1] == IGNORE).all() and e.labels[-1] == IGNORE


def _split(e):
    source = e.tokens[1 : e.prompt - 1]
    target = e.tokens[e.prompt : -1]
    return source.tolist(), target.tolist()


def test_copy_reverse_sort_answers():
    for name, expected in (("copy", lambda s: s), ("reverse", lambda s: s[::-1]), ("sort", sorted)):
        for i in range(10):
            source, target = _split(sample(make_task(name, vocab=7), 1, "test", 30, i))
            assert len(source) == 30 and target == list(expected(source))


def test_distinct_symbols():
    e = sample(make_task("copy", vocab=64, distinct=1), 0, "test", 64, 0)
    source, _ = _split(e)
    assert sorted(source) == list(range(4, 68))
    with pytest.raises(ValueError, match="length <= vocab"):
        sample(make_task("copy", vocab=8, distinct=1), 0, "test", 9, 0)


def test_mqmtar_answers_by_parsing_the_context():
    task = _task("mqmtar")
    names = task.token_names()
    for i in range(10):
        source, target = _split(sample(task, 2, "test", 120, i))
        words = [names[t] for t in source]
        context, queries = words[: -3 * task.queries], words[-3 * task.queries :]
        assert len(context) == 120
        table = {}
        for j, w in enumerate(context):
            if w == ":":
                key, value = tuple(context[j - 2 : j]), tuple(context[j + 1 : j + 3])
                assert key not in table
                table[key] = value
        assert len(table) == int(0.8 * 120 / 6)
        expected = []
        for q in range(task.queries):
            assert queries[3 * q] == "Q"
            expected += ["Q", *table[tuple(queries[3 * q + 1 : 3 * q + 3])]]
        assert [names[t] for t in target] == expected


def test_mqmtar_vocabularies_are_shared_across_splits_and_fixed_by_vocab_seed():
    a, b = (make_task("mqmtar", alphabet=16, n_keys=100, n_values=100) for _ in range(2))
    assert np.array_equal(a.vocabularies[0], b.vocabularies[0])
    c = make_task("mqmtar", alphabet=16, n_keys=100, n_values=100, vocab_seed=1)
    assert not np.array_equal(a.vocabularies[0], c.vocabularies[0])


@pytest.mark.parametrize("length", [5, 48, 3000])
def test_lookup_asks_symbols_seen_once_and_labels_their_successor(length):
    task = make_task("lookup", vocab=64, queries=4)
    for i in range(10):
        e = sample(task, 1, "test", length, i)
        context, questions = e.tokens[1 : length + 1].tolist(), e.tokens[length + 2 :].tolist()
        assert e.tokens[length + 1] == SEP and len(questions) == 4 and len(set(questions)) == 4
        assert (e.labels[: length + 2] == IGNORE).all()
        for asked, label in zip(questions, e.labels[length + 2 :].tolist(), strict=True):
            assert context.count(asked) == 1 and context.index(asked) < length - 1
            assert label == context[context.index(asked) + 1]
    repeated = sample(task, 1, "test", 3000, 0).tokens[1:3001]
    assert len(set(repeated.tolist())) <= 64


def test_flipflop_answer_is_the_last_written_bit():
    task = make_task("flipflop", p_write=0.3)
    names = task.token_names()
    for i in range(20):
        source, target = _split(sample(task, 0, "test", 40, i))
        words = [names[t] for t in source]
        assert words[0] == "w" and words[-2] == "r" and len(words) == 40
        last = max(j for j in range(0, 40, 2) if words[j] == "w")
        assert [names[t] for t in target] == [words[last + 1]]


def test_local_count_and_nback_labels():
    count = make_task("local_count", vocab=4, max_reps=5)
    names = count.token_names()
    for i in range(10):
        e = sample(count, 0, "test", 50, i)
        words, labels = [names[t] for t in e.tokens[1:]], [names[t] for t in e.labels[1:]]
        run = 0
        for j, w in enumerate(words):
            run = run + 1 if j and words[j - 1] == w else 0
            assert labels[j] == f"c{run}"
    nback = make_task("nback", vocab=5, n=3)
    e = sample(nback, 0, "test", 30, 0)
    body, labels = e.tokens[1:], e.labels[1:]
    assert (labels[:3] == IGNORE).all() and np.array_equal(labels[3:], body[:-3])


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("copy", {"colour": 1}, "no parameter"),
        ("copy", {"vocab": 1}, "vocab"),
        ("flipflop", {"p_write": 2.0}, "p_write"),
        ("mqmtar", {"density": 0.0}, "density"),
        ("mqmtar", {"n_keys": 10**6}, "n_keys"),
        ("lookup", {"queries": 0}, "queries"),
        ("lookup", {"vocab": 4}, "vocab must exceed queries"),
        ("nosuchtask", {}, "unknown task"),
        ("copy", {"vocab": "abc"}, "option vocab takes an integer, got 'abc'"),
        ("copy", {"vocab": "1.5"}, "option vocab takes an integer"),
        ("copy", {"vocab": 1.5}, "option vocab takes an integer"),
        ("copy", {"vocab": True}, "option vocab takes an integer"),
        ("flipflop", {"p_write": "often"}, "option p_write takes a number"),
    ],
)
def test_bad_task_parameters_are_named(name, options, message):
    with pytest.raises(ValueError, match=message):
        make_task(name, **options)


def test_task_options_given_as_text_are_cast_to_their_types():
    assert make_task("copy", vocab="12", distinct=1.0) == make_task("copy", vocab=12, distinct=1)
    assert make_task("flipflop", p_write="0.25").p_write == 0.25


def test_a_lookup_context_too_short_for_its_queries_is_refused():
    with pytest.raises(ValueError, match="length must exceed queries"):
        sample(make_task("lookup", queries=4), 0, "test", 4, 0)


def test_a_negative_length_is_refused_by_name_before_sampling():
    with pytest.raises(ValueError, match="length must be >= 1, got -4"):
        sample(make_task("copy"), 0, "test", -4, 0)
