import re
import shutil

import pytest

from vllm_w4a8_fastprep.tools import provenance


def test_the_variable_names_the_commit_of_a_copied_tree(monkeypatch):
    monkeypatch.setenv(provenance.COMMIT_ENV, "0123abcd")
    assert provenance.source_commit() == "0123abcd"


@pytest.mark.skipif(shutil.which("git") is None or not (provenance.ROOT / ".git").exists(),
                    reason="not a git checkout")
def test_a_checkout_reports_its_head(monkeypatch):
    monkeypatch.delenv(provenance.COMMIT_ENV, raising=False)
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", provenance.source_commit() or "")
