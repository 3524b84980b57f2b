"""The README's method table is the registry's (one source for --help, cards, README)."""

from __future__ import annotations

import re
from pathlib import Path

from flexlora_cli.methods.registry import METHODS, markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_method_table_is_generated_from_the_registry():
    text = README.read_text()
    table = re.search(r"<!-- methods table:.*?-->\n(.*?)<!-- end of methods table -->", text, re.S)
    assert table is not None, "README lost its methods table markers"
    assert table.group(1) == markdown_table(), "regenerate it with flexlora_cli.methods.registry.markdown_table()"
    for name in METHODS:
        assert f"`{name}`" in table.group(1)


def test_every_method_states_its_paper_rule_output_and_client_step():
    for method in METHODS.values():
        assert method.paper.startswith("https://arxiv.org/abs/"), method.name
        for text in (method.rule, method.server_writes, method.client_step):
            assert len(text) > 20, method.name
