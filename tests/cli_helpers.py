"""Run `condkit` in-process the way a shell would, for the CLI tests."""

from condkit.cli import main


def run(capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `condkit ARGV` (arguments may be paths or numbers)."""
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err
