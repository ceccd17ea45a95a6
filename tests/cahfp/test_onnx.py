"""ONNX export with parity checks, and inference that never imports torch."""

import io
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from cahfp import export as export_mod
from cahfp.data.datasets import dataset_info
from cahfp.export import ExportError, export_checkpoint, export_onnx, export_submodel
from cahfp.inference import DIGEST_KEY, InputError, ModelFileError, OnnxClassifier, digest_tail
from cahfp.models import build_model
from cahfp.pruning import extract, make_plan, score_groups
from cahfp.training import Recipe, train
from cahfp.wire import encode_state
from tests.conftest import TEST_SEED

INFO = dataset_info("fmnist")


def pruned(name, keep, width=0.25):
    model = build_model(name, 10, 1, width, seed=0).eval()
    if keep >= 1:
        return model
    x = torch.randn(8, 1, 28, 28)
    plan = make_plan(
        model, score_groups(model, [(x, torch.randint(0, 10, (8,)))], "curvature"), keep
    )
    return extract(model, plan).module.eval()


@pytest.mark.parametrize("name", ["vgg11", "vgg16", "resnet18", "resnet20"])
@pytest.mark.parametrize("keep", [1.0, 0.5])
def test_export_matches_torch(tmp_path, name, keep):
    module = pruned(name, keep)
    out = export_submodel(module, INFO, tmp_path / "m.onnx", keep=keep, round=3)
    assert out.max_abs_diff <= 1e-4 and out.bytes == (tmp_path / "m.onnx").stat().st_size
    clf = OnnxClassifier(out.path)
    assert clf.classes == INFO.classes and clf.input_shape == (1, 28, 28)
    assert clf.metadata["cahfp.keep"] == str(keep) and clf.metadata["cahfp.round"] == "3"
    x = np.random.default_rng(0).standard_normal((7, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(clf.logits(x), ref, atol=1e-4)


def test_failed_parity_fails_loudly_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "parity", lambda *a, **k: 0.5)
    with pytest.raises(ExportError, match="differs from torch"):
        export_submodel(pruned("vgg11", 1.0), INFO, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.fixture(scope="module")
def trained_export(tmp_path_factory, fmnist_train, fmnist_test):
    # lr 0.02: at 0.05 one epoch's accuracy swings by 0.2 with the CPU's kernels and the seed
    model = build_model("vgg11", 10, 1, 0.25, seed=TEST_SEED)
    train(model, fmnist_train.subset(range(3000)), Recipe(epochs=1, lr=0.02), seed=TEST_SEED)
    model.eval()
    path = tmp_path_factory.mktemp("onnx") / "fmnist.onnx"
    export_submodel(model, INFO, path, keep=1.0)
    return model, path, fmnist_test


def _torch_label(model, image_u8):
    x = (torch.from_numpy(image_u8).float()[None, None] / 255 - INFO.mean[0]) / INFO.std[0]
    with torch.no_grad():
        return INFO.classes[int(model(x).argmax())]


def test_cli_infer_on_real_fmnist_png_matches_torch_without_importing_torch(
    trained_export, tmp_path
):
    model, path, test = trained_export
    images, expected = [], []
    for i in range(4):
        arr = test.images[i, 0].numpy()
        file = tmp_path / f"img{i}.png"
        Image.fromarray(arr).save(file)
        images.append(str(file))
        expected.append(_torch_label(model, arr))
    proc = infer_cli(path, *images, "--top-k", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # the digest checked out, nothing converted
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 4
    for line, label in zip(lines, expected, strict=True):
        assert line.split(": ", 1)[1].rsplit(" ", 1)[0] == label
    np.save(tmp_path / "batch.npy", test.images[:4, 0].numpy())
    preds = OnnxClassifier(path).classify([str(tmp_path / "batch.npy")], top_k=1)
    assert [p.top[0][0] for p in preds] == expected


def infer_cli(*args) -> subprocess.CompletedProcess:
    """``cahfp infer ...`` in a fresh interpreter where importing torch fails."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None; "
        "from cahfp.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    return subprocess.run(
        [sys.executable, "-c", code, "infer", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_error_line(proc: subprocess.CompletedProcess, match: str) -> None:
    """Exit 2 with a single ``error: ...`` line on stderr (beside ``note:`` lines) that matches
    ``match``."""
    import re

    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert re.search(match, lines[0]), lines[0]


def test_photo_of_another_size_is_converted_unless_strict(trained_export, tmp_path):
    _, path, _ = trained_export
    photo = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(photo)
    proc = infer_cli(path, photo)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == (
        f"note: {photo}: image is 64x48 with 3 channel(s) (RGB), converted and resized to "
        "28x28 with 1 channel(s)"
    )
    assert proc.stdout.startswith(f"{photo}: ") and len(proc.stdout.split(", ")) == 3
    proc = infer_cli(path, photo, "--strict")
    one_error_line(proc, r"64x48 with 3 channel.*expects 28x28 with 1.*--strict")
    # no inputs is a usage error, not a silent success; --benchmark alone is fine
    one_error_line(infer_cli(path), "nothing to do: give images")
    proc = infer_cli(path, "--benchmark", "--batch", "2", "--iterations", "2")
    assert proc.returncode == 0 and proc.stdout.count("p50") == 2, proc.stderr


def test_corrupt_model_files_are_refused_with_one_line(trained_export, tmp_path):
    import onnx

    _, path, test = trained_export
    data = path.read_bytes()
    image = tmp_path / "img.png"
    Image.fromarray(test.images[0, 0].numpy()).save(image)
    # 8 bytes of the largest weight tensor overwritten with 0xFF (a float32 NaN pair)
    weights = max(onnx.load(path).graph.initializer, key=lambda t: len(t.raw_data)).raw_data
    at = data.index(weights) + len(weights) // 2
    broken = data[:at] + b"\xff" * 8 + data[at + 8 :]
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(broken)
    one_error_line(infer_cli(bad, image), r"bad\.onnx does not match the weights digest")
    # without a digest (a file exported before digests) it loads with a note, and the NaN
    # weights are caught at the output instead of printing 'T-shirt/top nan'
    meta = OnnxClassifier(path).metadata
    tail = digest_tail(meta[DIGEST_KEY])
    assert data.endswith(tail)
    unsigned = tmp_path / "unsigned.onnx"
    unsigned.write_bytes(broken[: -len(tail)])
    proc = infer_cli(unsigned, image)
    one_error_line(proc, r"computed non-finite outputs for .*img\.png")
    assert "carries no weights digest" in proc.stderr and proc.stdout == ""
    clean = tmp_path / "clean-unsigned.onnx"
    clean.write_bytes(data[: -len(tail)])
    proc = infer_cli(clean, image)
    assert proc.returncode == 0 and "carries no weights digest" in proc.stderr
    assert not OnnxClassifier(clean).verified and OnnxClassifier(path).verified
    # a class list shorter than the outputs (a correctly signed file)
    short = tmp_path / "short.onnx"
    export_onnx(
        pruned("vgg11", 1.0), (1, 28, 28), short, classes=INFO.classes[:9], mean=(0.5,), std=(0.5,)
    )
    one_error_line(infer_cli(short, image), r"lists 9 class names .* has 10 outputs")


def test_bad_inputs_and_files_give_clear_errors(trained_export, tmp_path):
    _, path, _ = trained_export
    clf = OnnxClassifier(path)
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(big)
    with pytest.raises(InputError, match=r"40x40 with 3 channel.*expects 28x28 with 1.*--strict"):
        clf.classify([str(big)], strict=True)
    (pred,) = clf.classify([str(big)])
    assert len(pred.top) == 3 and "converted and resized to 28x28" in pred.note
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(InputError, match="not a readable image"):
        clf.classify([str(junk)])
    np.save(tmp_path / "wrong.npy", np.zeros((2, 3, 32, 32), np.uint8))
    with pytest.raises(InputError, match="does not hold images of 1x28x28"):
        clf.classify([str(tmp_path / "wrong.npy")])
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ModelFileError, match="not a valid ONNX model"):
        OnnxClassifier(corrupt)
    foreign = tmp_path / "foreign.onnx"
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.nn.Linear(4, 2), (torch.zeros(1, 4),), buf, dynamo=False)
    foreign.write_bytes(buf.getvalue())
    with pytest.raises(ModelFileError, match="not one exported by CA-HFP"):
        OnnxClassifier(foreign)
    with pytest.raises(ModelFileError, match="does not exist"):
        OnnxClassifier(tmp_path / "missing.onnx")


def test_benchmark_reports_latency(trained_export):
    _, path, _ = trained_export
    b = OnnxClassifier(path, threads=1).benchmark(batch=4, iterations=5, warmup=1)
    assert b["p95_ms"] >= b["p50_ms"] > 0 and b["throughput"] > 0


@pytest.mark.trained
def test_pruned_checkpoint_export_recalibrates_batchnorm(trained_export, fmnist_root, tmp_path):
    """`cahfp export` of a trained global model at keep 0.5: cut out as it is, the submodel's
    inherited BatchNorm statistics sink it towards chance; recomputed on training data, it stays
    close to the dense model. The ONNX file is what is measured."""
    model, _, test = trained_export
    test = test.subset(range(2000))
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(encode_state(model.state_dict()))
    config = tmp_path / "fed.toml"
    config.write_text(
        '[model]\nname = "vgg11"\nwidth = 0.25\n'
        f'[data]\ndataset = "fmnist"\ndata_dir = "{fmnist_root}"\n'
    )
    images = test.images.numpy()
    dense = (OnnxClassifier(trained_export[1]).logits(_normalised(images)).argmax(1)).tolist()
    dense_acc = np.mean(np.array(dense) == test.targets.numpy())
    accuracy = {}
    for batches in (0, 8):
        out = export_checkpoint(
            config, checkpoint, 0.5, tmp_path / f"m{batches}.onnx", statistics_batches=batches
        )
        clf = OnnxClassifier(out.path)
        assert clf.metadata["cahfp.bn_statistics_images"] == str(64 * batches)
        pred = clf.logits(_normalised(images)).argmax(1)
        accuracy[batches] = float(np.mean(pred == test.targets.numpy()))
    assert dense_acc > 0.6
    assert accuracy[8] > dense_acc - 0.1, (dense_acc, accuracy)
    assert accuracy[8] > accuracy[0] + 0.1, (dense_acc, accuracy)


def _normalised(images_u8):
    x = images_u8.astype(np.float32) / 255
    return (x - INFO.mean[0]) / INFO.std[0]
