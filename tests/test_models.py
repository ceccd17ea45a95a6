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
