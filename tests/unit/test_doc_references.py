"""Every docs/ page a module names exists, and every section it quotes (`docs/protocol.md "Router"`) is a
heading there: the code's pointers into the documentation stay true when either moves."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = re.compile(r'docs/([\w.-]+\.md)(?:[,\'\s(]*"([^"\n]+)")?')


def references() -> list[tuple[str, str, str | None]]:
    found = []
    for path in sorted((ROOT / "entrypoint").rglob("*.py")) + [ROOT / "entrypoint" / "docker-entrypoint.sh"]:
        for page, section in REFERENCE.findall(path.read_text()):
            found.append((path.relative_to(ROOT).as_posix(), page, section or None))
    return found


def headings(page: str) -> list[str]:
    return [line.lstrip("#").strip() for line in (ROOT / "docs" / page).read_text().splitlines()
            if line.startswith("#")]


def test_every_docs_reference_in_the_code_resolves():
    refs = references()
    assert len(refs) > 10  # the modules do point into docs/
    missing_pages = sorted({(where, page) for where, page, _ in refs if not (ROOT / "docs" / page).is_file()})
    assert not missing_pages
    missing_sections = sorted({(where, page, section) for where, page, section in refs
                               if section and not any(section.lower() in h.lower() for h in headings(page))})
    assert not missing_sections
