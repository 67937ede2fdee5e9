import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_examples_run(page):
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)
    for block in blocks:
        exec(compile(block, str(page), "exec"), {})


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_point_at_files_of_the_repository(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if not target.startswith(("http://", "https://", "#")):
            assert (page.parent / target.split("#")[0]).exists(), f"{page.name} links to missing {target}"


def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250
    first_screen = "\n".join(lines[:30])
    assert "make demo" in first_screen and "make test" in first_screen


def test_related_work_tables_are_those_of_their_records():
    from sparsa.experiments import results

    text = (DOCS / "related-work.md").read_text()
    for name in ("related_copy_results.json", "related_reverse_results.json"):
        record = results.load(DOCS / name)
        for metric in ("exact_match", "token_accuracy"):
            rows = results.table(record, metric).split("\n\n")[0]
            assert rows in text, (name, metric)


@pytest.mark.parametrize(
    ("page", "record", "metric", "lengths"),
    [
        ("docs/language-models.md", "lm_results.json", "exact_match", None),
        ("docs/language-models.md", "lm_results.json", "bits_per_byte", None),
        ("docs/length-generalization.md", "demo_results.json", "exact_match", None),
        ("docs/length-generalization.md", "lookup_results.json", "exact_match", None),
        ("README.md", "demo_results.json", "exact_match", 5),
    ],
)
def test_results_tables_are_those_of_their_records(page, record, metric, lengths):
    """Every row of the record's table is on the page (the README shows the first ``lengths`` columns)."""
    from sparsa.experiments import results

    text = (ROOT / page).read_text()
    _, _, *rows = results.table(results.load(DOCS / record), metric).split("\n\n")[0].splitlines()
    for row in rows:
        cells = row.strip("|").split("|")
        shown = cells if lengths is None else cells[: 1 + lengths]
        assert "|" + "|".join(shown) + "|" in text, (page, record, metric, row)
