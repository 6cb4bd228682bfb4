"""How a `fishcomp` process ends: the garbage collector frozen at exit when the CLI is the
process's own command, so the last collections skip what torch and timm made on import."""

import subprocess
import sys

import pytest

# An atexit handler registered before the CLI's own runs after it (last in, first out), so it sees
# the collector as the interpreter's final collections will.
EXIT = """
import atexit, gc, sys
atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0))
from fishcomp.cli import main
sys.argv = ["fishcomp", "--version"]
main() if {own} else main(["--version"])  # its own command line, or called with arguments
"""


@pytest.mark.parametrize("own, frozen", [(True, True), (False, False)])
def test_the_collector_is_frozen_at_exit_only_when_the_cli_is_the_process_command(own, frozen):
    done = subprocess.run([sys.executable, "-c", EXIT.format(own=own)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"frozen at exit: {frozen}"  # and the command's own output came first
    assert "fishcomp" in done.stdout.splitlines()[0]
