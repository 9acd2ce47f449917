"""Model factory. Architectures are chosen by name so that a checkpoint can rebuild its model.

`small_cnn` is mlpipe's own network for small images; every other name is a timm architecture
(`timm.create_model`, e.g. resnet18, convnext_tiny, efficientnet_b0), built for the run's channel
count and class count. Both adapt to the training resolution (`ingest.image_size`): small_cnn
adds stages until its receptive field covers the image, and a timm ResNet on small images keeps
more resolution in its stem (see `small_image_stem`).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from mlpipe.errors import MlpipeError

WORKING_SIZE = 16  # small_cnn: the side its stem reduces the image to, at most (pixels)
FINAL_SIZE = 4  # small_cnn: stages are added until the feature map is this small (pixels)


def _conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    padding = kernel // 2 if stride == 1 else 0
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))  # fmt: skip


class SmallCNN(nn.Module):
    """A VGG-style network (Simonyan and Zisserman 2015: stacked 3x3 convolutions, 2x2 max
    pooling, channels doubling per stage) sized by the image side `image_size` (pixels):

    - stem: a 3x3 convolution when the image is at most WORKING_SIZE (16) px; larger images are
      first cut into non-overlapping s x s patches (a stride-s convolution, s the smallest power
      of two that brings the side to <= 16), as ViT and ConvNeXt stems do, so the cost stays that
      of a 16 px image;
    - stages of two 3x3 convolutions (the first stage one, after the stem) then 2x2 max pooling,
      repeated until the map is FINAL_SIZE (4) px or smaller; channels `width`, 2 x width, ...
      capped at 4 x width; global average pooling, dropout 0.2, a linear classifier.

    Every output unit of the last stage therefore sees the whole image (its receptive field is
    larger than `image_size`; tests/unit/test_train.py checks this at 8-64 px by gradients).
    Input: (N, in_channels, image_size, image_size) normalized floats; output: (N, num_classes) logits.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: int = 32):
        super().__init__()
        stride = 1
        while image_size // stride > WORKING_SIZE:
            stride *= 2
        layers = [_conv_bn_relu(in_channels, width, kernel=3 if stride == 1 else stride, stride=stride)]
        side, channels, stage = max(1, image_size // stride), width, 0
        while True:
            out = min(width * 2**stage, 4 * width)
            for _ in range(1 if stage == 0 else 2):
                layers.append(_conv_bn_relu(channels, out))
                channels = out
            if side <= FINAL_SIZE:
                break
            layers.append(nn.MaxPool2d(2))
            side, stage = side // 2, stage + 1
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(channels, num_classes))

    def forward(self, x):
        return self.head(self.pool(self.features(x)))

    def get_classifier(self) -> nn.Module:  # timm's name for the head, so both kinds answer the same call
        return self.head


def is_known(name: str) -> bool:
    """small_cnn or any architecture timm can build (`timm.list_models()`)."""
    if name == "small_cnn":
        return True
    import timm

    return timm.is_model(name)


def build_model(name: str, in_channels: int, num_classes: int, image_size: int, pretrained: str | None = None) -> nn.Module:
    """The network for (N, in_channels, image_size, image_size) inputs and `num_classes` logits.

    `pretrained` (see `TrainConfig.pretrained`): None, random initialization; a local weights file
    (.pth/.bin/.safetensors state dict: timm's, torchvision's, or an mlpipe checkpoint for
    small_cnn); a local folder used as the download cache (air-gapped machines: the Hugging Face
    hub / torch hub cache copied there); or a timm pretrained tag ("a1_in1k", or the full
    "resnet18.a1_in1k"; torchvision's ImageNet weights are timm's "tv_in1k"), downloaded once into
    the standard cache (`HF_HOME`, `TORCH_HOME`). timm adapts the first convolution to
    `in_channels` and drops a classifier of another class count.
    Raises MlpipeError (one line) for an unknown name or weights that cannot be had.
    """
    if name == "small_cnn":
        model = SmallCNN(in_channels, num_classes, image_size)
        if pretrained is not None:
            load_pretrained(model, pretrained)
        return model
    if not is_known(name):
        raise MlpipeError(f"unknown model '{name}': small_cnn or a timm architecture (timm.list_models())")
    import timm

    args: dict = {"in_chans": in_channels, "num_classes": num_classes}
    if pretrained is not None:
        local = Path(pretrained).expanduser()
        if local.is_file():
            args.update(pretrained=True, pretrained_cfg_overlay={"file": str(local)})
        elif local.is_dir():
            args.update(pretrained=True, cache_dir=str(local))
        else:
            name = pretrained if pretrained.startswith(f"{name}.") else f"{name}.{pretrained}"
            args.update(pretrained=True)
    try:
        model = timm.create_model(name, **args)
    except Exception as err:  # no network, unknown tag, a file of another architecture
        if pretrained is None:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MlpipeError(f"train.pretrained '{pretrained}' for {name.split('.')[0]}: {type(err).__name__}: {first} "
                          "(offline: give a local weights file or a folder holding the download cache)") from err  # fmt: skip
    small_image_stem(model, image_size)
    return model


def small_image_stem(model: nn.Module, image_size: int) -> bool:
    """ResNets (a `conv1` + `maxpool` stem, total stride 32) on small images: drop the max pool,
    then the stem convolution's stride, while the last stage's map would be under FINAL_SIZE px,
    as CIFAR ResNets do (He et al. 2016, section 4.2). Weights stay usable: only strides change.
    Returns whether the stem was changed; other architectures are left as timm builds them."""
    conv, pool = getattr(model, "conv1", None), getattr(model, "maxpool", None)
    if not isinstance(conv, nn.Conv2d) or pool is None or conv.stride != (2, 2):
        return False
    changed = False
    if image_size // 32 < FINAL_SIZE and not isinstance(pool, nn.Identity):
        model.maxpool, changed = nn.Identity(), True
    if image_size // 16 < FINAL_SIZE:
        conv.stride, changed = (1, 1), True
    return changed


def load_pretrained(model: nn.Module, path: str) -> dict[str, int]:
    """small_cnn weights from a local file (a state dict or an mlpipe checkpoint), loaded with
    `weights_only=True` (a file is data, never code). Tensors whose shape differs (another class
    count or image size) keep their fresh initialization. Returns what was loaded and skipped."""
    import torch

    if not Path(path).expanduser().is_file():
        raise MlpipeError(f"train.pretrained '{path}': small_cnn takes a local weights file, and there is none there")
    state = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model_state" in state:  # an mlpipe checkpoint
        state = state["model_state"]
    target = model.state_dict()
    usable = {k: v for k, v in state.items() if k in target and target[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    return {"loaded": len(usable), "skipped": len(state) - len(usable), "missing": len(target) - len(usable)}


def last_conv_layer(model: nn.Module) -> nn.Module:
    """The layer Grad-CAM explains: small_cnn's last conv block; a timm model's last feature stage
    (`feature_info`, e.g. a ResNet's layer4)."""
    if isinstance(model, SmallCNN):
        return model.features[-1]
    return model.get_submodule(model.feature_info[-1]["module"])


def freeze_backbone(model: nn.Module, trainable: bool = False) -> int:
    """Set `requires_grad` of everything but the classifier head (`get_classifier()`) to
    `trainable`; the head always trains. Returns the trainable parameter count."""
    head = set(map(id, model.get_classifier().parameters()))
    for p in model.parameters():
        p.requires_grad = trainable or id(p) in head
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def head_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(backbone, head) parameters, for the fine-tuning learning rates."""
    head = list(model.get_classifier().parameters())
    ids = set(map(id, head))
    return [p for p in model.parameters() if id(p) not in ids], head


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
    model = build_model(ckpt["model"], ckpt["in_channels"], ckpt["num_classes"], ckpt["image_size"])
    model.load_state_dict(ckpt["model_state"])
    serving = ServingModel(model, ckpt["mean"], ckpt["std"]).eval()
    serving.arch = ckpt["model"]  # which architecture, for explanations (Grad-CAM's layer)
    return serving
