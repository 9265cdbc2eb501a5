"""The README and docs/: every relative link resolves (file and heading), and every command they show still
parses with its script's own argument parser."""
import re
import shlex

import pytest
from conftest import ROOT

import data
import eval as evaluation
import sample
import train

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PARSERS = {"train.py": train.parse_args, "sample.py": sample.parse_args, "eval.py": evaluation.parse_args,
           "data.py": data.parse_args}


def anchors(page) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"(?m)^#+ (.+)$", page.read_text())
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def links(page):
    text = re.sub(r"(?s)```.*?```", "", page.read_text())  # not inside code blocks
    return [m for m in re.findall(r"\]\(([^)\s]+)\)", text) if not m.startswith(("http://", "https://"))]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_resolve(page):
    for link in links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists() and ROOT in target.parents, f"{page.name}: {link}"
        if anchor:
            assert anchor in anchors(target), f"{page.name}: {link} (no such heading)"


def commands(page):
    """(script, arguments) of every `python X.py ...` or `torchrun ... X.py ...` line of the page's bash blocks
    and inline code, continuation lines joined and comments dropped."""
    text = page.read_text()
    blocks = re.findall(r"(?s)```bash\n(.*?)```", text) + re.findall(r"`((?:python|torchrun) [^`]+)`", text)
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            scripts = [i for i, w in enumerate(words) if w in PARSERS]
            if words and words[0] in ("python", "torchrun") and scripts:
                yield words[scripts[0]], words[scripts[0] + 1:]


CASES = [(page, script, argv) for page in PAGES for script, argv in commands(page)]


def test_the_pages_show_commands():
    assert len([c for c in CASES if c[0].name == "README.md"]) >= 8


@pytest.mark.parametrize("page, script, argv", CASES, ids=[f"{p.name}: {s} {' '.join(a)[:60]}" for p, s, a in CASES])
def test_each_command_parses(page, script, argv):
    argv = [a.replace("<file>", "x.png").replace("<instruction>", "x") for a in argv]
    PARSERS[script](argv)  # exits with status 2 on a flag the script does not have, or a bad value
