"""Model factory. Architectures are chosen by name so that a checkpoint can rebuild its model."""

from __future__ import annotations

from torch import nn


class SmallCNN(nn.Module):
    """Three conv blocks and global pooling: enough for tiny images (8-64 px), fast on a CPU."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))

        self.features = nn.Sequential(
            block(in_channels, width),
            block(width, width),
            nn.MaxPool2d(2),
            block(width, 2 * width),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(2 * width, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


ARCHITECTURES = {"small_cnn": SmallCNN}


def build_model(name: str, in_channels: int, num_classes: int) -> nn.Module:
    try:
        return ARCHITECTURES[name](in_channels, num_classes)
    except KeyError:
        raise ValueError(f"unknown model '{name}' (known: {', '.join(ARCHITECTURES)})") from None


class ServingModel(nn.Module):
    """What gets registered: raw pixel values (0-255, NCHW float32) in, class probabilities out."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1).float())
        self.register_buffer("std", std.reshape(1, -1, 1, 1).float())

    def forward(self, x):
        return self.model((x / 255.0 - self.mean) / self.std).softmax(dim=1)


def load_checkpoint(path) -> ServingModel:
    """Rebuild the model a checkpoint describes. `weights_only=True`: a checkpoint is data, never code."""
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(ckpt["model"], ckpt["in_channels"], ckpt["num_classes"])
    model.load_state_dict(ckpt["model_state"])
    return ServingModel(model, ckpt["mean"], ckpt["std"]).eval()
