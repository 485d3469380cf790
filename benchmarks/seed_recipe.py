"""The seed recipe this project starts from (ALEXNET.md), re-implemented faithfully as
the baseline of the throughput benchmark, defects included: per-sample PIL Resize +
ToTensor in a DataLoader, 96-256-384-384-256 convs without LRN or groups, F.dropout in
forward without `training=`, log_softmax + nll_loss, Adam with defaults, batch 64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms


class SeedAlexNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 227):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 96, 11, stride=4)
        self.conv2 = nn.Conv2d(96, 256, 5, padding=2)
        self.conv3 = nn.Conv2d(256, 384, 3, padding=1)
        self.conv4 = nn.Conv2d(384, 384, 3, padding=1)
        self.conv5 = nn.Conv2d(384, 256, 3, padding=1)
        side = image_size
        side = (side - 11) // 4 + 1
        for _ in range(3):
            side = (side - 3) // 2 + 1
        self.fc1 = nn.Linear(256 * side * side, 4096)
        self.fc2 = nn.Linear(4096, 4096)
        self.fc3 = nn.Linear(4096, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 3, 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 3, 2)
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        x = F.max_pool2d(F.relu(self.conv5(x)), 3, 2)
        x = torch.flatten(x, 1)
        x = F.dropout(F.relu(self.fc1(x)), 0.5)  # the seed's defect: on at eval too
        x = F.dropout(F.relu(self.fc2(x)), 0.5)
        return F.log_softmax(self.fc3(x), dim=1)


class PilDataset(torch.utils.data.Dataset):
    """uint8 images served as PIL images through a torchvision transform, per sample."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, image_size: int):
        self.images, self.labels = images, labels
        self.transform = transforms.Compose([transforms.Resize(image_size), transforms.ToTensor()])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        image = Image.fromarray(self.images[i, 0].numpy(), mode="L")
        return self.transform(image), int(self.labels[i])


def loader(images, labels, image_size: int, batch_size: int = 64):
    return torch.utils.data.DataLoader(
        PilDataset(images, labels, image_size), batch_size=batch_size, shuffle=True
    )


def train_step(model, optimizer, x, y) -> torch.Tensor:
    optimizer.zero_grad()
    loss = F.nll_loss(model(x), y)
    loss.backward()
    optimizer.step()
    return loss
