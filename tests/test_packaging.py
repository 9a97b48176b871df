"""Packaging: the folder-to-namespace mapping, a light `import omni`, and a non-editable install."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_import_omni_is_light_and_fast(tmp_path):
    code = (
        "import sys, time; t = time.perf_counter(); import omni; dt = time.perf_counter() - t\n"
        "heavy = [m for m in ('megatron', 'transformer_engine', 'transformers', 'torch') if m in sys.modules]\n"
        "print(dt, heavy)"
    )
    r = _run(code, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    dt, heavy = r.stdout.split(" ", 1)
    assert float(dt) < 2.0
    assert heavy.strip() == "[]", heavy


def test_every_package_folder_is_listed_in_pyproject():
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    mapping = {v: k for k, v in conf["package-dir"].items()}  # folder -> import name
    found = set()
    for init in ROOT.glob("**/__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if rel.parts[0] in {"tests", "bench", "build", ".venv", "docs"} or rel.parts[0].startswith("."):
            continue
        top = mapping.get(rel.parts[0])
        assert top is not None, f"{rel} is not under a mapped folder"
        found.add(".".join([top, *rel.parts[1:]]))
    assert found == listed, f"missing from pyproject: {found - listed}; listed but absent: {listed - found}"


def test_repo_root_does_not_shadow_pypi_tokenizers():
    r = _run("import tokenizers, omni.tokenizers.text; print(tokenizers.__file__); print(hasattr(tokenizers, 'Encoding'))", cwd=ROOT)
    assert r.returncode == 0, r.stderr
    path, has_encoding = r.stdout.split()
    assert "site-packages" in path and has_encoding == "True"


def test_non_editable_install_has_every_module_and_recipe(tmp_path):
    """Build and install the wheel (no deps) into a folder, then import from there, outside the repo."""
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    code = (
        "import omni, omni.tokenizers.text, omni.tokenizers.base, omni.decoders, omni.parallel, omni.eval\n"
        "from omni.config import recipes_dir, load_config, RunConfig\n"
        "from omni.eval.demo import DemoRunConfig\n"
        "from pathlib import Path\n"
        "root = Path(str(recipes_dir()))\n"
        "recipes = sorted(p.relative_to(root).as_posix() for p in root.rglob('*.yaml'))\n"
        "[load_config(DemoRunConfig if r.startswith('demo/') else RunConfig, root / r) for r in recipes]\n"
        "print(omni.__file__); print(omni.tokenizers.text.__file__); print(' '.join(recipes))"
    )
    r = _run(code, cwd=tmp_path, env={"PYTHONPATH": str(target)})
    assert r.returncode == 0, r.stderr
    omni_file, text_file, recipes = r.stdout.strip().split("\n")
    assert omni_file.startswith(str(target)) and text_file.startswith(str(target / "omni" / "tokenizers"))
    shipped = sorted(p.relative_to(ROOT / "recipes").as_posix() for p in (ROOT / "recipes").rglob("*.yaml"))
    assert recipes.split() == shipped


def test_cli_version_and_help():
    r = subprocess.run([sys.executable, "-m", "omni", "--version"], capture_output=True, text=True, cwd=ROOT.parent)
    assert r.returncode == 0 and re.fullmatch(r"omni \d+\.\d+\.\d+\n", r.stdout)
    for args in (["--help"], ["tokenizer", "--help"], ["tokenizer", "train", "text", "--help"]):
        r = subprocess.run([sys.executable, "-m", "omni", *args], capture_output=True, text=True, cwd=ROOT.parent)
        assert r.returncode == 0, (args, r.stderr)
    assert "vocab_size" in r.stdout and "Number of text pieces" in r.stdout  # field docs in --help
