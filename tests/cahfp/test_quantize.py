"""INT8 for boards without a GPU (``cahfp export --quantize int8``): a signed static QDQ model
with per-channel int8 weights, activations calibrated on the exporter's own images, about a
quarter of the float file, within a point of its accuracy; and ``cahfp infer --provider``."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from cahfp.data.datasets import dataset_info
from cahfp.errors import CAHFPError
from cahfp.export import export_submodel
from cahfp.inference import OnnxClassifier
from cahfp.models import build_model
from cahfp.quantize import calibration_images, onnx_accuracy, quantize_int8
from cahfp.training import Recipe, train
from cahfp.wire import encode_state
from tests.conftest import REPO, TEST_SEED

INFO = dataset_info("fmnist")


@pytest.fixture(scope="module")
def trained(fmnist_train, fmnist_test):
    model = build_model("vgg11", 10, 1, 0.25, seed=TEST_SEED)
    train(model, fmnist_train.subset(range(3000)), Recipe(epochs=1, lr=0.02), seed=TEST_SEED)
    return model.eval(), fmnist_train, fmnist_test.subset(range(1000))


@pytest.mark.trained
def test_an_int8_export_is_quantized_per_channel_signed_smaller_and_as_accurate(trained, tmp_path):
    model, train_set, test = trained
    images = calibration_images(train_set.subset(range(2000)), 256)
    fp = export_submodel(model, INFO, tmp_path / "f.onnx", keep=1.0)
    q = export_submodel(model, INFO, tmp_path / "q.onnx", int8_images=images, keep=1.0)
    assert q.quantization == "int8" and q.float_bytes == fp.bytes
    assert q.bytes < 0.35 * fp.bytes, (q.bytes, fp.bytes)
    assert q.agreement > 0.95
    graph = onnx.load(q.path).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights and max(len(t.dims) for t in weights) == 4  # conv kernels stored as int8
    per_channel = [
        n for n in graph.node
        if n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute)
    ]  # fmt: skip
    assert per_channel  # one scale per output channel
    clf = OnnxClassifier(q.path)
    assert clf.verified and clf.metadata["cahfp.calibration_images"] == "256"
    assert clf.metadata["cahfp.quantization"].startswith("int8 static QDQ")
    float_acc = onnx_accuracy(fp.path.read_bytes(), test)
    int8_acc = onnx_accuracy(q.path.read_bytes(), test)
    assert float_acc > 0.6 and int8_acc > float_acc - 0.03, (float_acc, int8_acc)


def test_calibration_images_are_checked_before_quantizing():
    graph = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["input"], ["logits"])],
            "g",
            [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [None, 1, 2, 2])],
            [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [None, 1, 2, 2])],
        )
    )
    with pytest.raises(CAHFPError, match="NaN or infinite"):
        quantize_int8(graph, np.full((2, 1, 2, 2), np.nan, dtype=np.float32))
    with pytest.raises(CAHFPError, match=r"batch of images \[N, C, H, W\]"):
        quantize_int8(graph, np.zeros((0, 1, 2, 2), dtype=np.float32))


@pytest.mark.trained
def test_cahfp_export_quantize_reports_size_and_accuracy_of_both(trained, fmnist_root, tmp_path):
    model, _, _ = trained
    (tmp_path / "model.safetensors").write_bytes(encode_state(model.state_dict()))
    (tmp_path / "config.toml").write_text(
        '[model]\nname = "vgg11"\nwidth = 0.25\n'
        f'[data]\ndataset = "fmnist"\ndata_dir = "{fmnist_root}"\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "cahfp.cli", "export", "--run", str(tmp_path), "--keep", "0.5",
         "--quantize", "int8", "--out", str(tmp_path / "m.onnx")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("int8: ") and "accuracy on 1000 test images float" in line, line
    float_acc, int8_acc = (float(w.rstrip(",")) for w in line.split()[-3::2])
    assert float_acc > 0.5 and int8_acc > float_acc - 0.03, line
    assert OnnxClassifier(tmp_path / "m.onnx").metadata["cahfp.keep"] == "0.5"


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_a_provider_onnxruntime_lacks_is_one_line_naming_the_package(provider, tmp_path):
    name = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[provider]
    if name in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has {name}")
    proc = subprocess.run(
        [sys.executable, "-m", "cahfp.cli", "infer", str(tmp_path / "m.onnx"), "--benchmark",
         "--provider", provider],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "install onnxruntime-gpu" in lines[0], proc.stderr


def test_a_board_exports_int8_calibrated_on_its_own_images(tmp_path, caplog):
    """``cahfp client --export-dir DIR --quantize int8``: after a round the board writes the INT8
    model calibrated on its own images; ``--quantize`` alone is refused in one line."""
    import logging
    from types import SimpleNamespace

    import torch

    from cahfp.data.datasets import ImageData
    from cahfp.messages import ModelSpec
    from edge_client.agent import Agent

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (96, 1, 28, 28), generator=g, dtype=torch.uint8)
    data = ImageData(x, torch.arange(96) % 10, INFO.classes, INFO.mean, INFO.std, "n")
    agent = SimpleNamespace(
        state=SimpleNamespace(data=data), export_dir=tmp_path, quantize="int8", me="pi-01"
    )
    spec = ModelSpec(name="vgg11", width=0.25, num_classes=10, in_channels=1, image_size=28)
    task = SimpleNamespace(round=4, model=spec)
    metrics = SimpleNamespace(keep_achieved=1.0)
    result = SimpleNamespace(
        submodel=build_model("vgg11", 10, 1, 0.25, seed=0), message=SimpleNamespace(metrics=metrics)
    )
    with caplog.at_level(logging.INFO):
        Agent._export(agent, task, result, b"global")
    clf = OnnxClassifier(tmp_path / "model.onnx")
    assert clf.verified and clf.metadata["cahfp.calibration_images"] == "96"
    assert clf.metadata["cahfp.round"] == "4"
    assert clf.metadata["cahfp.quantization"].startswith("int8 static QDQ")
    assert "exported INT8 model" in caplog.text
    proc = subprocess.run(
        [sys.executable, "-m", "cahfp.cli", "client", "--broker", "mqtt://127.0.0.1:1", "--id",
         "a", "--data", "fmnist", "--quantize", "int8"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: --quantize needs --export-dir (where the quantized model is written)"
    ), proc.stderr


def test_arm_cores_without_dot_product_are_recognised():
    from cahfp.cli.infer import int8_dot_product

    pi4 = "processor : 0\nFeatures : fp asimd evtstrm crc32 cpuid\nCPU part : 0xd08\n"
    pi5 = "processor : 0\nFeatures : fp asimd evtstrm aes pmull sha1 sha2 crc32 asimddp\n"
    assert int8_dot_product(pi4, "aarch64") is False
    assert int8_dot_product(pi5, "aarch64") is True
    assert int8_dot_product(pi4, "x86_64") is True
