"""The command starts fast: `--help` imports neither torch nor transformers, `methods` no transformers; the
heavy imports happen inside the commands that need them."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import contextlib, io, sys
from mmtoken.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
    main(sys.argv[1:])
print(sorted(name for name in ("torch", "transformers") if name in sys.modules), len(out.getvalue().splitlines()))
"""


@pytest.mark.parametrize(
    ("argv", "heavy"),
    [(["--help"], "[]"), (["demo", "--help"], "[]"), (["methods"], "['torch']")],
)
def test_a_command_imports_only_what_it_needs(argv, heavy):
    result = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=True)
    imported, lines = result.stdout.split("] ")
    assert imported + "]" == heavy
    assert int(lines) > 3  # the command printed its help or its list


def test_the_package_names_load_on_first_use():
    code = "import sys, mmtoken; assert 'torch' not in sys.modules; mmtoken.patch; assert 'mmtoken.api' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
