"""The one-line error rule of every command-line tool of this package."""


def one_line_error(capsys, *phrases) -> str:
    """What was written to stderr is one line holding every phrase; returns it."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for p in phrases:
        assert p in lines[0], (p, err)
    return lines[0]
