"""docs/benchmarks.md's table blocks are bench/summarize.py's output for the committed results files."""

import difflib

from bench import summarize


def test_docs_tables_are_current(tmp_path):
    docs = summarize.ROOT / "docs" / "benchmarks.md"
    regenerated = tmp_path / "benchmarks.md"
    regenerated.write_text(docs.read_text())
    summarize.update_docs(regenerated)
    before, after = docs.read_text().splitlines(), regenerated.read_text().splitlines()
    stale = [line[:160] for line in difflib.unified_diff(before, after, lineterm="", n=0)]
    hint = "docs/benchmarks.md's tables are stale: run `python bench/summarize.py --update-docs`"
    assert not stale, "\n".join([hint, *stale[:12]])
