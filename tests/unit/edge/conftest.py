"""A toy labelled task: a small CNN with a linear head trained on the synthetic shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vitssl.data_pipelines.synthetic import write_default_dataset


class ToyCNN(nn.Module):
    """``(B, 3, 32, 32) -> (B, 10)`` logits; ``backbone`` pools to 32 features."""

    output_kind = "logits"

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("edge_data")
    write_default_dataset(root, train_per_class=300, val_per_class=100, shard_size=3000)
    return {
        "train": str(root / "train" / "train-000000.tar"),
        "val": str(root / "val" / "val-000000.tar"),
        "root": str(root),
    }


@pytest.fixture(scope="session")
def toy_model(toy_data: dict[str, str]) -> ToyCNN:
    """Trained for 800 one-cycle steps (a few seconds): 100 % on the held-out shapes (chance
    10 %; ~65 % on the data's first, multicoloured style), with margins wide enough that INT8
    rounding flips few predictions."""
    from vitssl.train.edge.data import load_images

    train = load_images(toy_data["train"], 32)
    torch.set_num_threads(1)  # the CI machine is shared: one thread is the fastest here
    torch.manual_seed(0)
    model = ToyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps = 800
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=steps)
    x, y = torch.from_numpy(train.images), torch.from_numpy(train.labels)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(len(x), (32,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return model.eval()


def write_image(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path
