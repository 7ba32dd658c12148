"""The docs: the generated pages are current, every setting and command is documented, the
README stays a front door, and every relative link lands on a file and heading that exist.
No broker."""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import pytest

from triage import docs
from triage.cli import COMMANDS, build_parser
from triage.settings import settings_rows

ROOT = Path(__file__).parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def hand_written(page: Path) -> str:
    """The page without its generated part."""
    text = page.read_text(encoding="utf-8")
    start = text.find("<!-- BEGIN GENERATED")
    return text if start < 0 else text[:start] + text[text.find(docs.END):]


def test_the_generated_pages_are_current() -> None:
    assert docs.stale() == [], "stale generated docs: run `make docs`"


def test_every_setting_is_in_the_configuration_reference() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    missing = [env for env, _, _ in settings_rows() if f"| `{env}` |" not in page]
    assert missing == [], f"not in docs/configuration.md (run `make docs`): {missing}"


def test_every_command_is_described_by_hand_and_every_subcommand_has_a_reference() -> None:
    parser = build_parser()
    found = {path: sub for path, _, sub in docs.commands(parser)}
    assert {path for path in found if " " not in path} == set(COMMANDS)
    cli = ROOT / "docs" / "cli.md"
    overview, page = hand_written(cli), cli.read_text(encoding="utf-8")
    assert [c for c in COMMANDS if f"`triage {c}" not in overview] == [], \
        "a command without a row in docs/cli.md's table of commands"
    assert [p for p in found if f"### `triage {p}`" not in page] == [], \
        "a command without its reference in docs/cli.md (run `make docs`)"
    # Subcommands given as a positional choice (`triage dlq replay`) are described by hand.
    choices = [f"{path} {choice}" for path, sub in found.items() for action in sub._actions
               if not action.option_strings and action.choices is not None
               and not isinstance(action, argparse._SubParsersAction)
               for choice in action.choices]
    assert choices, "expected positional subcommands such as `triage dlq replay`"
    assert [c for c in choices if f"`triage {c}" not in overview] == []


def test_the_readme_is_a_front_door_of_at_most_250_lines() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 250, f"README.md has {lines} lines: move the detail to docs/"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the text without Markdown, lower case, punctuation other
    than hyphens and underscores dropped, spaces made hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of the page's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    found, times = set(), {}
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        base = slug(heading)
        found.add(f"{base}-{times[base]}" if base in times else base)
        times[base] = times.get(base, 0) + 1
    return found


def links(page: Path) -> list[str]:
    text = CODE.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    return [target for target in LINK.findall(text)
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def test_every_relative_link_points_to_a_file_and_a_heading_that_exist() -> None:
    broken = []
    for page in PAGES:
        for target in links(page):
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []
    assert any("#" in target for page in PAGES for target in links(page))


def test_the_link_check_sees_broken_links_and_github_anchors(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# The embedded broker's differences (`x`, 2026)\n\n```sh\n# not a heading"
                    "\n[in code](nowhere.md)\n```\n\n[a](page.md#gone) [b](#the-embedded-brokers"
                    "-differences-x-2026) `[c](nowhere.md)` [d](https://example.com)\n")
    assert anchors(page) == {"the-embedded-brokers-differences-x-2026"}
    assert links(page) == ["page.md#gone", "#the-embedded-brokers-differences-x-2026"]


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the docs pages the generator owns, under a root of their own."""
    (tmp_path / "docs").mkdir()
    for page in docs.PAGES:
        shutil.copy(ROOT / page, tmp_path / page)
    return tmp_path


def test_check_names_a_stale_page_and_make_docs_rewrites_it(
        checkout: Path, capsys: pytest.CaptureFixture[str]) -> None:
    page = checkout / "docs" / "configuration.md"
    text = page.read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| `TRIAGE_GROUP_ID` |"))
    page.write_text(text.replace(row + "\n", ""), encoding="utf-8")
    assert docs.main(["--check", "--root", str(checkout)]) == 1
    assert "docs/configuration.md is stale: run `make docs`" in capsys.readouterr().err
    assert docs.main(["--root", str(checkout)]) == 0
    assert page.read_text(encoding="utf-8") == text
    assert docs.main(["--check", "--root", str(checkout)]) == 0


def test_a_page_without_its_markers_is_refused_with_status_2(
        checkout: Path, capsys: pytest.CaptureFixture[str]) -> None:
    page = checkout / "docs" / "cli.md"
    page.write_text(page.read_text(encoding="utf-8").replace(docs.END, ""), encoding="utf-8")
    assert docs.main(["--check", "--root", str(checkout)]) == 2
    assert "docs/cli.md has lost its markers" in capsys.readouterr().err
