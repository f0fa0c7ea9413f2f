"""README and docs/: a README a newcomer can finish, whose commands are those CI runs, and links that
lead somewhere in the repository (never into files users do not have)."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_the_readme_is_short_and_gives_the_commands_ci_runs():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) < 250
    test_command = 'python3 -m pip install -e ".[test]" && python3 -m pytest tests'
    assert test_command in readme and test_command in (REPO / ".ci" / "run").read_text().splitlines()
    assert "python3 -m pip install -e . && python3 -m pytest audits/" in readme
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme  # a CPU-only torch, without 3 GB of CUDA


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_link_leads_to_a_file_and_heading_of_the_repository(page):
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.is_file() and REPO in linked.parents, f"{page.name}: {target}"
        assert not anchor or anchor in anchors(linked), f"{page.name}: {target}: no such heading"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_pages_point_nowhere_users_do_not_have_and_show_runnable_commands(page):
    text = page.read_text()
    assert not re.search(r"(\.\./)?shared/", text), f"{page.name} points into shared/"
    for line in re.findall(r".*pytest_memaudit\.train_demo.*", text):  # its --out is required
        assert "--out" in line, f"{page.name}: {line.strip()}"
