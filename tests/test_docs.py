"""The documentation site builds strictly, and its API reference covers every public name."""

import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings")

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = [
    "sparsa",
    "sparsa.normalize",
    "sparsa.attention",
    "sparsa.layers",
    "sparsa.models",
    "sparsa.integrations.transformers",
    "sparsa.tasks",
]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    environment = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)]
    done = subprocess.run(build, cwd=ROOT, capture_output=True, text=True, env=environment)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@pytest.mark.parametrize("package", PACKAGES)
def test_the_api_reference_lists_every_name_of_the_package(site, package):
    page = (site / "api" / package.replace(".", "-") / "index.html").read_text()
    documented = set(re.findall(rf'id="{re.escape(package)}\.([A-Za-z_][A-Za-z0-9_]*)"', page))
    module = importlib.import_module(package)
    names = getattr(module, "__all__", None) or [
        name for name, value in vars(module).items() if getattr(value, "__module__", None) == package
    ]
    # Submodules have pages of their own or are documented through the names they export.
    public = {n for n in names if not n.startswith("_") and not inspect.ismodule(getattr(module, n))}
    missing = {name for name in public - documented if not _documented_elsewhere(site, getattr(module, name))}
    assert not missing, f"{package}: not in the reference: {sorted(missing)}"


def _documented_elsewhere(site, value) -> bool:
    """A re-export (``sparsa.attention`` is the function of ``sparsa.attention``) on its package's page."""
    for other in PACKAGES:
        module = importlib.import_module(other)
        for name in getattr(module, "__all__", ()):
            if getattr(module, name) is value:
                page = (site / "api" / other.replace(".", "-") / "index.html").read_text()
                if f'id="{other}.{name}"' in page:
                    return True
    return False


def test_the_cli_reference_covers_every_command(site):
    from sparsa.cli import build_parser

    page = (site / "cli" / "index.html").read_text()
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in commands:
        assert f"sparsa {command}" in page, command


@pytest.mark.parametrize(
    "module", ["sparsa.normalize.maps", "sparsa.attention.api", "sparsa.attention.paged"]
)
def test_docstring_examples_run(module):
    import doctest

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    failed, attempted = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert attempted > 0 and failed == 0
