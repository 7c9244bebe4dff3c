"""The toolkit installs and runs beside the libraries its users have: every import name we install is
ours alone, transformers and our packages import together in one process, and every command starts
from any working directory (the repository root, an empty directory, a user's project with its own
`tools/`, `gpt.py` and `kernels/`).

What this guards against: Hugging Face's hub-kernels package (import name `kernels`, a dependency of
transformers since 5.25) once shared its import name with our Triton package, so that one of the two
was hidden depending on the working directory.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import ROOT

DISTRIBUTION = "gpt2-toolkit"
BIN = Path(sys.executable).parent


def our_import_names() -> set[str]:
    """The top-level packages pyproject.toml ships (`[tool.setuptools.packages.find] include`)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["packages"]["find"]["include"]
    return {p.rstrip("*") for p in patterns}


def our_console_scripts() -> list[str]:
    return sorted(ep.name for ep in metadata.distribution(DISTRIBUTION).entry_points if ep.group == "console_scripts")


def clean_env() -> dict[str, str]:
    """The environment a user's shell gives: no PYTHONPATH pointing at the repository."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env.update(OMP_NUM_THREADS="1", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    return env


@pytest.fixture
def users_project(tmp_path) -> Path:
    """A working directory holding modules named like ours and like Hugging Face's, as a user's
    project may: none of them may be imported by a command started there."""
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "__init__.py").write_text("raise ImportError('the user project tools/ was imported')\n")
    (tmp_path / "tools" / "train.py").write_text("raise ImportError('the user project tools/train.py was imported')\n")
    (tmp_path / "gpt.py").write_text("raise ImportError('the user project gpt.py was imported')\n")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("raise ImportError('the user project kernels/ was imported')\n")
    return tmp_path


def test_every_import_name_we_install_is_provided_by_our_distribution_alone():
    names = our_import_names()
    installed = metadata.distribution(DISTRIBUTION).read_text("top_level.txt")
    assert installed is not None and set(installed.split()) == names, installed
    owners = metadata.packages_distributions()
    for name in sorted(names):
        others = set(owners.get(name, [])) - {DISTRIBUTION}
        assert not others, f"import name {name!r} is also installed by {sorted(others)}"
    assert names == {"tokenizers_bpe", "gpt2_kernels", "gpt", "tools"}, names  # what the README promises


def test_the_pinned_environment_has_transformers_with_hub_kernels():
    """The lock must hold a transformers that brings Hugging Face's `kernels`, or the collision test
    above checks nothing."""
    pins = dict(re.findall(r"(?m)^([A-Za-z0-9_.-]+)==([^\s;]+)", (ROOT / "requirements" / "dev.lock").read_text()))
    major, minor = (int(x) for x in pins["transformers"].split(".")[:2])
    assert (major, minor) >= (5, 25), pins["transformers"]
    assert "kernels" in pins
    assert "torch" not in pins  # torch comes from TORCH_SPEC (the CPU build), installed first


IMPORT_BOTH = """
import sys
import transformers
from transformers import GPT2LMHeadModel
import kernels  # Hugging Face's
import gpt2_kernels, gpt, gpt.model, tokenizers_bpe, tools, tools.cli
from pathlib import Path
assert Path(kernels.__file__).parents[1].name == "site-packages", kernels.__file__  # not a folder of ours
print(gpt2_kernels.__file__, tools.__file__, GPT2LMHeadModel.__name__)
"""


@pytest.mark.parametrize("where", ["repository root", "empty directory"])
def test_transformers_and_our_packages_import_in_one_process(where, tmp_path):
    cwd = ROOT if where == "repository root" else tmp_path
    done = subprocess.run([sys.executable, "-c", IMPORT_BOTH], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ours, tools_file, _ = done.stdout.split()
    assert Path(ours).resolve().is_relative_to(ROOT) and Path(tools_file).resolve().is_relative_to(ROOT)


def test_every_command_starts_from_any_directory(users_project):
    scripts = our_console_scripts()
    assert {"bpe-train", "gpt-train", "gpt-generate", "gpt-convert", "gpt-genre-experiment"} <= set(scripts), scripts
    cases = [(name, cwd) for cwd in (ROOT, users_project) for name in scripts]

    def run(case):
        name, cwd = case
        return subprocess.run([str(BIN / name), "--help"], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                              timeout=300)

    with ThreadPoolExecutor(max_workers=4) as pool:  # each start imports torch: a few at a time
        for (name, cwd), done in zip(cases, pool.map(run, cases)):
            assert done.returncode == 0, f"{name} --help in {cwd}: {done.stderr[-2000:]}"
            assert "usage:" in done.stdout, (name, done.stdout[:200])


def test_our_wheel_installs_no_file_of_another_distribution(tmp_path):
    """What `pip install .` writes (the wheel's RECORD) against every file the other installed
    distributions own, transformers' and hub-kernels' included; and the environment is consistent."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", *sorted(our_import_names())):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir() else {}))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("gpt2_toolkit-*.whl")
    with zipfile.ZipFile(wheel) as z:
        record = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))).decode()
    ours = {line.rsplit(",", 2)[0] for line in record.splitlines() if line}
    assert {p.split("/")[0] for p in ours if not p.split("/")[0].endswith(".dist-info")} == our_import_names()
    for dist in metadata.distributions():
        if dist.metadata["Name"] == DISTRIBUTION:
            continue
        shared = ours & {str(f) for f in dist.files or ()}
        assert not shared, f"{dist.metadata['Name']} owns {sorted(shared)[:5]}"
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
