"""The README's commands work as written (litgpt's and lucidrains' README tests)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    """Fenced blocks of ``lang`` that a '<!-- README test' comment announces."""
    pat = re.compile(r"<!-- README test[^>]*-->\s*```" + lang + r"\n(.*?)```", re.S)
    return pat.findall(README)


def test_setup_is_exactly_two_commands_and_ci_runs_the_test_one():
    setup = README.split("## Set-up", 1)[1].split("##", 1)[0]
    block = re.search(r"```bash\n(.*?)```", setup, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test: \$\(STAMP\).*\n\t\$\(BIN\)/pytest", makefile, re.M)
    # `make demo` is `omni demo`, the command tests/test_demo.py runs end to end (at --budget small)
    assert re.search(r"^demo: \$\(STAMP\)\n\t\$\(BIN\)/omni demo --out runs/demo\n", makefile, re.M)


def test_usage_block_runs(tmp_path):
    (block,) = _blocks("bash")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    for line in block.strip().splitlines():
        argv = shlex.split(line)
        if argv[0] == "python":
            argv[0] = sys.executable
        r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (line, r.stdout, r.stderr)
    assert r.stdout.strip() == "a red circle <boi>"  # decode of the last line prints the text back
    (py,) = _blocks("python")
    r = subprocess.run([sys.executable, "-c", py], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
