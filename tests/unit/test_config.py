"""The one settings object: its reference (`instructrec config`) and the documentation that names it."""

from __future__ import annotations

import re
from pathlib import Path

from instructrec.cli import main
from instructrec.config import Settings, reference

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "deploy").rglob("README.md"))]


def test_the_reference_names_every_setting_once_and_each_rebuilds_the_setting(monkeypatch) -> None:
    rows = reference()
    names = [variable for variable, _, _ in rows]
    assert len(names) == len(set(names)) > 50
    assert "INSTRUCTREC_KAFKA__TOPICS__RECOMMENDATIONS" in names  # nested sections are flattened
    assert ("INSTRUCTREC_STREAM__BATCH_SIZE", "16", "queries per micro-batch (one Triton call)") in rows
    monkeypatch.setenv("INSTRUCTREC_STREAM__BATCH_SIZE", "7")  # a listed name is one the settings read
    assert Settings().stream.batch_size == 7


def test_every_setting_a_document_names_exists() -> None:
    known = {variable for variable, _, _ in reference()}
    for document in DOCUMENTS:
        named = set(re.findall(r"INSTRUCTREC_[A-Z0-9_]*[A-Z0-9]", document.read_text()))
        sections = {n for n in named if any(k.startswith(n + "__") for k in known)}
        stray = named - known - sections - {"INSTRUCTREC_CONFIG_FILE"}
        assert not stray, f"{document.relative_to(REPO)} names settings that do not exist: {sorted(stray)}"


def test_the_config_command_prints_the_reference_as_markdown(capsys) -> None:
    assert main(["config", "--markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["| variable | default | |", "|---|---|---|"]
    assert len(lines) == 2 + len(reference())
