"""The `kiln` command's top level: how a run ends when the user presses Ctrl-C."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# A command interrupted by Ctrl-C, then a second Ctrl-C while the process winds down (atexit handlers:
# torch's compile-time dump, weakref finalizers), as when a user presses it twice.
TWICE = textwrap.dedent("""
    import atexit, os, signal, time
    from kiln import cli

    def second_ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1.0)

    def interrupted(args):
        raise KeyboardInterrupt

    atexit.register(second_ctrl_c)
    cli.cmd_runs = interrupted
    raise SystemExit(cli.main(["runs"]))
""")


def test_ctrl_c_twice_ends_with_one_line_and_no_traceback() -> None:
    done = subprocess.run([sys.executable, "-c", TWICE], capture_output=True, text=True, timeout=60)
    assert done.stderr.strip() == "kiln: interrupted"
    assert done.returncode in (130, -2)  # 130 by exit, or the SIGINT's own death (the shell shows 130)
