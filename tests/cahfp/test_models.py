import pytest
import torch

from cahfp.costs import param_count
from cahfp.errors import UnknownName
from cahfp.models import build_model, model_names

NAMES = ["vgg11", "vgg16", "resnet18", "resnet20"]


def test_registry_lists_all_models():
    assert set(NAMES) <= set(model_names())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("size", "channels", "classes"), [(28, 1, 10), (32, 3, 10), (32, 3, 100)])
@pytest.mark.parametrize("width", [0.25, 0.5])
def test_forward_backward(name, size, channels, classes, width):
    model = build_model(name, classes, channels, width)
    x = torch.randn(3, channels, size, size)
    out = model(x)
    assert out.shape == (3, classes)
    out.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# Reference counts: the CIFAR models of kuangliu/pytorch-cifar (VGG('VGG11'), VGG('VGG16'),
# ResNet18()), 3 input channels, 10 classes, as printed by sum(p.numel() for p in ...).
@pytest.mark.parametrize(
    ("name", "expected"), [("vgg11", 9_231_114), ("vgg16", 14_728_266), ("resnet18", 11_173_962)]
)
def test_parameter_count_matches_reference(name, expected):
    assert param_count(build_model(name, 10, 3, 1.0)) == expected


def test_width_scales_channels():
    small, big = build_model("vgg11", 10, 1, 0.25), build_model("vgg11", 10, 1, 0.5)
    assert small.features[0].out_channels == 16 and big.features[0].out_channels == 32
    assert param_count(small) < param_count(big) / 3


def test_seed_makes_init_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("resnet20", 10, 1, 0.5, seed=7)
    after = torch.rand(1)
    b = build_model("resnet20", 10, 1, 0.5, seed=7)
    c = build_model("resnet20", 10, 1, 0.5, seed=8)
    assert before == after
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert any(not torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters(), strict=True))


def test_unknown_model_is_a_clear_error():
    with pytest.raises(UnknownName, match="vgg11"):
        build_model("vgg99")


def _write_module(root, name: str, body: str) -> None:
    (root / f"{name}.py").write_text(body)


OWN = """
import torch
from torch import nn

def build(num_classes, in_channels, width):
    c = max(2, round(16 * width))
    return nn.Sequential(
        nn.Conv2d(in_channels, c, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1, groups=c), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes),
    )

def broken(num_classes, in_channels, width):
    raise RuntimeError("no such layer\\non two lines")

def not_a_module(num_classes, in_channels, width):
    return 42

not_callable = 3
"""


def test_own_model_by_module_and_callable(tmp_path, monkeypatch):
    from cahfp.models.registry import is_own_model

    _write_module(tmp_path, "own_net_ok", OWN)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("own_net_ok:build", 7, 2, 0.5, seed=3)
    assert model(torch.zeros(2, 2, 12, 12)).shape == (2, 7)
    again = build_model("own_net_ok:build", 7, 2, 0.5, seed=3)  # seeded like registered models
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True)
    )
    ex = build_model("examples.mobilenet_like:build", 10, 1, 0.5)
    assert ex(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert any(m.groups > 1 for m in ex.modules() if isinstance(m, torch.nn.Conv2d))
    assert is_own_model("a.b_c:d.e") and not is_own_model("mynet") and not is_own_model("a:")


def test_own_model_errors_are_one_line_and_name_the_module(tmp_path, monkeypatch):
    from cahfp.errors import ModelUnavailable

    _write_module(tmp_path, "own_net_bad", OWN)
    _write_module(tmp_path, "own_net_syntax", "def build(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = {
        "no_such_pkg.net:build": "cannot import module 'no_such_pkg.net'.*PYTHONPATH",
        "own_net_syntax:build": "cannot import module 'own_net_syntax' \\(SyntaxError",
        "own_net_bad:missing": "module 'own_net_bad' has no 'missing'",
        "own_net_bad:not_callable": "is not callable",
        "own_net_bad:broken": "failed to build with num_classes=10.*RuntimeError: no such layer on",
        "own_net_bad:not_a_module": "returned int, not a torch.nn.Module",
    }
    for name, pattern in cases.items():
        with pytest.raises(ModelUnavailable, match=pattern) as info:
            build_model(name, 10, 1, 1.0)
        assert "\n" not in str(info.value) and name in str(info.value)


def test_unknown_plain_name_lists_known_models_and_the_module_form():
    from cahfp.config import ConfigError, load_config

    with pytest.raises(UnknownName, match=r"known models: resnet18.*package.module:callable"):
        build_model("mynet")
    with pytest.raises(ConfigError, match=r"'mynet'.*known models: .*vgg11.*module:callable"):
        load_config(overrides={"model.name": "mynet"})
    # the form is checked when the config is read; the module is imported when it is built
    assert load_config(overrides={"model.name": "elsewhere.net:build"}).model.name == (
        "elsewhere.net:build"
    )
