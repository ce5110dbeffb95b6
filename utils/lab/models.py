"""The book's models: the source's LeNet-5 (fixed), LeNet-300-100, and a VGG-style CNN."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LeNet5(nn.Module):
    """The source's network (section 4), fixed: ``F`` imported, 32x32 inputs, ``torch.flatten``.

    MNIST digits are 28x28; :func:`utils.lab.data.load_mnist` pads them to 32x32, the size
    LeNet-5 was designed for, so that two 5x5 convolutions and two poolings leave 16x5x5.
    ``widths`` (filters of conv1 and conv2, neurons of fc1 and fc2) makes a thinner variant, for
    example the architecture that structured pruning of half the units leaves, trained from
    scratch (chapter 4.2).
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int, int] = (6, 16, 120, 84)):
        super().__init__()
        c1, c2, h1, h2 = widths
        self.conv1 = nn.Conv2d(1, c1, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.fc1 = nn.Linear(c2 * 5 * 5, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)  # not view(-1, 400): that breaks once filters are removed
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class LeNet300100(nn.Module):
    """The fully connected LeNet-300-100 (LeCun et al. 1998) on flattened images."""

    def __init__(self, in_features: int = 32 * 32, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


VGG_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M")


class VGG(nn.Module):
    """A small VGG-style CNN for 32x32 inputs (CIFAR size): 3x3 Conv-BN-ReLU blocks, max-pooling.

    ``cfg`` lists output channels, ``"M"`` a 2x2 max-pool; ``width`` scales every layer.
    Used for timing, where random weights are as good as trained ones.
    """

    def __init__(
        self,
        cfg: Sequence[int | str] = VGG_CFG,
        in_channels: int = 3,
        num_classes: int = 10,
        width: float = 1.0,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, size = in_channels, image_size
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                out = max(1, int(round(int(v) * width)))
                layers += [
                    nn.Conv2d(c, out, 3, padding=1, bias=False),
                    nn.BatchNorm2d(out),
                    nn.ReLU(inplace=True),
                ]
                c = out
        self.features = nn.Sequential(*layers)
        hidden = max(1, int(round(512 * width)))
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * size * size, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 Conv-BN layers and a skip connection (He et al. 2016); a 1x1 Conv-BN on the skip
    where the block changes the width or the resolution."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet (He et al. 2016) for 1x32x32 digits: a 3x3 stem, three stages of
    ``blocks`` basic blocks at 32, 16 and 8 pixels, global average pooling, one Linear.

    ``blocks=3`` with ``widths=(16, 32, 64)`` is ResNet-20 (19 convolutions and the Linear).
    The additions of the skip connections tie the channels of every block of a stage together,
    which is why :func:`utils.pruning.shrink` refuses this network and chapter 5.2 prunes it with
    Torch-Pruning's dependency graph.
    """

    def __init__(
        self,
        blocks: int = 3,
        widths: tuple[int, int, int] = (16, 32, 64),
        in_channels: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, c = [], widths[0]
        for i, w in enumerate(widths):
            layers = [
                BasicBlock(c if j == 0 else w, w, 2 if i > 0 and j == 0 else 1)
                for j in range(blocks)
            ]
            stages.append(nn.Sequential(*layers))
            c = w
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
