import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def test_readme_first_screen_gives_the_two_commands():
    first_screen = "\n".join(README.read_text().splitlines()[:30])
    assert "make demo" in first_screen and "make test" in first_screen


def test_readme_related_work_tables_are_those_of_their_records():
    from sparsa.experiments import results

    text = README.read_text()
    for name in ("related_copy_results.json", "related_reverse_results.json"):
        record = results.load(README.parent / "docs" / name)
        for metric in ("exact_match", "token_accuracy"):
            rows = results.table(record, metric).split("\n\n")[0]
            assert rows in text, (name, metric)
