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


TORCHVISION = ("resnet18", "resnet34", "resnet50", "convnext_tiny", "efficientnet_b0")
ARCHITECTURES = ("small_cnn", *TORCHVISION)
HEADS = {"small_cnn": "head", "resnet18": "fc", "resnet34": "fc", "resnet50": "fc",
         "convnext_tiny": "classifier", "efficientnet_b0": "classifier"}  # fmt: skip


class ChannelAdapter(nn.Module):
    """torchvision's ImageNet architectures take 3 channels: grayscale is repeated (so pretrained
    filters still apply), any other count goes through a learned 1x1 convolution."""

    def __init__(self, in_channels: int, body: nn.Module):
        super().__init__()
        self.in_channels = in_channels
        self.mix = None if in_channels in (1, 3) else nn.Conv2d(in_channels, 3, 1)
        self.body = body

    def forward(self, x):
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        elif self.mix is not None:
            x = self.mix(x)
        return self.body(x)


def build_model(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """small_cnn, or a torchvision architecture (random init; see `load_pretrained`)."""
    if name == "small_cnn":
        return SmallCNN(in_channels, num_classes)
    if name not in TORCHVISION:
        raise ValueError(f"unknown model '{name}' (known: {', '.join(ARCHITECTURES)})")
    import torchvision

    return ChannelAdapter(in_channels, getattr(torchvision.models, name)(weights=None, num_classes=num_classes))


def _body(model: nn.Module) -> nn.Module:
    return model.body if isinstance(model, ChannelAdapter) else model


def load_pretrained(model: nn.Module, path: str) -> dict[str, int]:
    """Weights from a local file (a state dict, e.g. torchvision's downloaded .pth), loaded with
    `weights_only=True`. Tensors whose shape differs (the classifier head for another class
    count) keep their fresh initialization. Returns what was loaded and what was skipped."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model_state" in state:  # an mlpipe checkpoint
        state = state["model_state"]
    target = _body(model).state_dict()
    usable = {k: v for k, v in state.items() if k in target and target[k].shape == v.shape}
    _body(model).load_state_dict(usable, strict=False)
    return {"loaded": len(usable), "skipped": len(state) - len(usable), "missing": len(target) - len(usable)}


def last_conv_layer(model: nn.Module, name: str) -> nn.Module:
    """The layer Grad-CAM explains: the last convolutional stage of each architecture."""
    body = _body(model)
    if name == "small_cnn":
        return body.features[3]  # the last conv block, before global pooling
    if name.startswith("resnet"):
        return body.layer4
    return body.features[-1]  # convnext / efficientnet


def freeze_backbone(model: nn.Module, name: str) -> int:
    """Train only the classifier head (and a channel adapter); returns the trainable parameter count."""
    head = getattr(_body(model), HEADS[name])
    for p in model.parameters():
        p.requires_grad = False
    trainable = [*head.parameters(), *(model.mix.parameters() if getattr(model, "mix", None) is not None else [])]
    for p in trainable:
        p.requires_grad = True
    return sum(p.numel() for p in trainable)


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
    serving = ServingModel(model, ckpt["mean"], ckpt["std"]).eval()
    serving.arch = ckpt["model"]  # which architecture, for explanations (Grad-CAM's layer)
    return serving
