"""AlexNet has exactly the paper's layers, dropout only in training, a clear size error."""

import pytest
import torch
from torch import nn

from alexops.lrn import LocalResponseNorm
from alexops.model import MIN_IMAGE_SIZE, AlexNet, feature_size, initialise


def layer_signature(model: AlexNet) -> list[tuple]:
    out = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            out.append(
                (
                    "conv",
                    module.out_channels,
                    module.kernel_size[0],
                    module.stride[0],
                    module.padding[0],
                    module.groups,
                )
            )
        elif isinstance(module, nn.MaxPool2d):
            out.append(("pool", module.kernel_size, module.stride))
        elif isinstance(module, LocalResponseNorm):
            out.append(("lrn", module.size, module.alpha, module.beta, module.k))
        elif isinstance(module, nn.Linear):
            out.append(("fc", module.in_features, module.out_features))
        elif isinstance(module, nn.Dropout):
            out.append(("dropout", module.p))
    return out


def test_the_papers_layers_at_width_one():
    model = AlexNet(in_channels=1, num_classes=10)
    lrn = ("lrn", 5, 5e-4, 0.75, 2.0)
    assert layer_signature(model) == [
        ("conv", 96, 11, 4, 0, 1), lrn, ("pool", 3, 2),
        ("conv", 256, 5, 1, 2, 2), lrn, ("pool", 3, 2),
        ("conv", 384, 3, 1, 1, 1),
        ("conv", 384, 3, 1, 1, 2),
        ("conv", 256, 3, 1, 1, 2), ("pool", 3, 2),
        ("fc", 256 * 6 * 6, 4096), ("dropout", 0.5),
        ("fc", 4096, 4096), ("dropout", 0.5),
        ("fc", 4096, 10),
    ]  # fmt: skip
    # LRN sits after the ReLU of conv1 and conv2 (paper §3.3)
    kinds = [type(m).__name__ for m in model.features]
    assert kinds[:4] == ["Conv2d", "ReLU", "LocalResponseNorm", "MaxPool2d"]
    assert kinds[4:8] == ["Conv2d", "ReLU", "LocalResponseNorm", "MaxPool2d"]


def test_paper_size_and_parameter_count():
    assert feature_size(227) == 6
    model = AlexNet(in_channels=3, num_classes=1000)
    assert 60e6 < sum(p.numel() for p in model.parameters()) < 62e6  # ~61 M (ALEXNET.md)


def test_forward_gives_logits_for_every_class():
    model = AlexNet(1, 10, image_size=67, width=0.125)
    assert model(torch.randn(3, 1, 67, 67)).shape == (3, 10)


def test_dropout_is_off_in_eval_and_on_in_train():
    torch.manual_seed(0)
    model = AlexNet(1, 10, image_size=67, width=0.125)
    x = torch.randn(2, 1, 67, 67)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("size", [66, 32, 28])
def test_inputs_below_the_geometry_minimum_are_a_clear_error(size):
    with pytest.raises(ValueError, match=f"at least {MIN_IMAGE_SIZE}.*got {size}"):
        AlexNet(1, 10, image_size=size)


def test_an_input_of_another_size_names_both_sizes():
    model = AlexNet(1, 10, image_size=67, width=0.125)
    with pytest.raises(ValueError, match=r"67×67.*\(28, 28\)"):
        model(torch.randn(1, 1, 28, 28))


def test_paper_initialisation():
    torch.manual_seed(0)
    model = AlexNet(3, 10, image_size=67, width=0.5, init="paper")
    biases = {
        name: m.bias.unique().tolist()
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    }
    assert biases == {
        "features.0": [0.0], "features.4": [1.0], "features.8": [0.0],
        "features.10": [1.0], "features.12": [1.0],
        "classifier.0": [1.0], "classifier.3": [1.0], "classifier.6": [0.0],
    }  # fmt: skip
    assert abs(model.classifier[3].weight.std().item() - 0.01) < 1e-3
    with pytest.raises(ValueError, match="unknown init"):
        initialise(model, "xavier")


def test_width_keeps_group_splits_even():
    model = AlexNet(1, 10, image_size=67, width=0.3)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            assert module.out_channels % 2 == 0
