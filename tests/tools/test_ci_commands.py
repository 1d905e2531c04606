"""CI runs the README's commands: ``.ci/run`` holds the README's set-up command and test
command as they are written there (what a new user types is what CI checks), and runs the
same tests with the same options in its second venv."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _block_after(text: str, heading: str) -> str:
    """The first ```bash block under ``heading``: its one command."""
    section = text.split(heading, 1)[1]
    m = re.search(r"```bash\n(.*?)\n```", section, re.S)
    assert m, heading
    lines = [ln for ln in m.group(1).splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_ci_runs_the_readmes_set_up_and_test_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    set_up = _block_after(readme, "## Set up (one command")
    test = _block_after(readme, "## Test (one command)")
    assert set_up in ci, set_up
    assert test in ci, test
    # the newest vLLM's venv: the same tests, the same options, from build/
    newest = test.replace(".venv/bin/python", '"$NEWEST/bin/python"').replace(" tests", " ../tests")
    assert newest in ci, newest
    # pytest-xdist in both venvs (the test command's -n)
    assert "pytest-xdist" in set_up
    assert re.search(r'"\$NEWEST/bin/pip" install .*\n\s*pytest pytest-xdist', "\n".join(ci))
