"""`StagedNet`: stem -> stages -> classifier head, with the backbone contract every model shares.

Family files build the stem and stages; this class gives them the same API:
``forward_features``, ``forward_head``, ``reset_classifier``, ``feature_info``,
``features_only`` / ``out_indices``, ``output_stride``, ``frozen_stages``, ``norm_eval`` and gradient
checkpointing.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import ClassifierHead


class FeatureInfo(dict):
    """One feature level: its channels, its stride from the input, the module producing it and its index.

    A dict with timm's keys (``info["num_chs"]``, ``dict(info)``, ``timm.models.FeatureInfo`` takes a list
    of them), also read as attributes (``info.num_chs``).
    """

    def __init__(self, num_chs: int, reduction: int, module: str, index: int):
        super().__init__(num_chs=num_chs, reduction=reduction, module=module, index=index)

    num_chs = property(lambda self: self["num_chs"])
    reduction = property(lambda self: self["reduction"])
    module = property(lambda self: self["module"])
    index = property(lambda self: self["index"])  # the level's number (0: the stem), as timm's entries carry it


_FEATURE_KEYS = ("num_chs", "reduction", "module", "index")


OUTPUT_STRIDES = (8, 16, 32)


class OutputStrideError(ValueError):
    """A model cannot be built with the ``output_stride`` asked for."""


@dataclass(frozen=True)
class StageDilation:
    """How one stage is built under an output stride: the stride of its downsampling conv, that
    conv's dilation (``first_dilation``) and the dilation of the 3x3 (or larger) convs after it."""

    stride: int
    first_dilation: int = 1
    dilation: int = 1


def check_output_stride(output_stride: int | None) -> None:
    if output_stride is not None and (not _is_int(output_stride) or output_stride not in OUTPUT_STRIDES):
        raise OutputStrideError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")


def dilate_stages(stem_stride: int, strides: Sequence[int], output_stride: int | None) -> list[StageDilation]:
    """Each stage's `StageDilation` for a network whose deepest maps are at ``output_stride`` (8, 16, 32).

    Once the maps are at ``output_stride``, a stage that would downsample keeps stride 1 and dilates
    instead: its downsampling conv keeps the previous dilation and the convs after it multiply it by
    the stride, so every conv sees the input region it sees undilated (torchvision's
    ``replace_stride_with_dilation``, timm's ``output_stride``). ``None``: the network as designed.
    """
    check_output_stride(output_stride)
    plan, reduction, dilation = [], stem_stride, 1
    for stride in strides:
        first_dilation = dilation
        if output_stride is not None and reduction >= output_stride and stride > 1:
            dilation, stride = dilation * stride, 1
        reduction *= stride
        plan.append(StageDilation(stride, first_dilation, dilation))
    return plan


class FeatureInfoList(list):
    """Every feature level's `FeatureInfo`, with the accessors of timm's ``FeatureInfo``: without
    ``idx`` they answer for the levels the model returns (``out_indices``); an int ``idx`` picks any
    level, and a list or tuple several (``channels()``, ``reduction()``, ``module_name()``, ``get(key)``,
    ``get_dicts(keys)``)."""

    def __init__(self, infos: list[FeatureInfo], out_indices: tuple[int, ...]):
        super().__init__(infos)
        self.out_indices = out_indices

    def _levels(self, idx):
        return self.out_indices if idx is None else idx

    def get(self, key: str, idx: int | list[int] | tuple[int, ...] | None = None):
        levels = self._levels(idx)
        if isinstance(levels, (tuple, list)):
            return [self[i][key] for i in levels]
        return self[levels][key]

    def channels(self, idx=None):
        return self.get("num_chs", idx)

    def reduction(self, idx=None):
        return self.get("reduction", idx)

    def module_name(self, idx=None):
        return self.get("module", idx)

    def get_dicts(self, keys: list[str] | None = None, idx=None):
        keys = _FEATURE_KEYS if keys is None else keys
        levels = self._levels(idx)
        if isinstance(levels, (tuple, list)):
            return [{k: self[i][k] for k in keys} for i in levels]
        return {k: self[levels][k] for k in keys}


class _RestoreNormStats:
    """Context that puts a module's BatchNorm buffers back as they were on entry.

    Checkpointing re-runs a stage's forward in the backward pass; in train mode that would update
    the running statistics a second time with the same batch. Recomputation runs inside this
    context, so a checkpointed step leaves exactly the statistics of a plain step.
    """

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.saved = [
            (buf, buf.clone())
            for m in self.module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for buf in m.buffers()
        ]
        return self

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for buf, value in self.saved:
                buf.copy_(value)


def _checkpoint_contexts(module: nn.Module):
    # (forward context, recomputation context) for torch.utils.checkpoint's context_fn
    return contextlib.nullcontext(), _RestoreNormStats(module)


def _skip_deleted_stages(module: StagedNet, state_dict: dict, prefix: str, *_) -> None:
    # A load_state_dict pre-hook: a state dict written with the stages `keep_levels` deleted (a whole
    # model's, a detector checkpoint written before detectors kept only the levels they tap) loads.
    deleted = tuple(f"{prefix}{name}." for name in module.deleted_stages)
    for key in [k for k in state_dict if k.startswith(deleted)]:
        del state_dict[key]


def deleted_stage_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The state-dict prefixes (``backbone.body.stages.5.``) of the stages every `StagedNet` in ``model``
    deleted (`StagedNet.keep_levels`): a file's tensors under them belong to no module and are skipped."""
    return tuple(f"{name}.{stage}." if name else f"{stage}."
                 for name, m in model.named_modules() if isinstance(m, StagedNet) for stage in m.deleted_stages)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class StagedNet(nn.Module):
    """A classification network made of a stem, a list of stages and a pooled linear head.

    Feature level 0 is the stem's output and level ``i`` the output of ``stages[i - 1]``.
    ``stage_strides`` are the strides the stages were built with: a builder that takes ``output_stride``
    gets them, and the dilations, from `dilate_stages`. ``output_stride`` here only checks that the
    deepest level is at most that stride, so a builder that cannot dilate refuses it. A ``features_only``
    model holds the stages up to the deepest level it returns and no more (`keep_levels`).
    ``stage_min_input_sizes`` are the smallest image height and width each stage runs on (an unpadded
    pool needs a map of at least its window); a smaller input is refused by name, not with a pooling
    error deep inside.
    """

    def __init__(
        self,
        stem: nn.Module,
        stem_chs: int,
        stem_stride: int,
        stages: list[nn.Module],
        stage_chs: list[int],
        stage_strides: list[int],
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        features_only: bool = False,
        out_indices: tuple[int, ...] | None = None,
        output_stride: int | None = None,
        frozen_stages: int = -1,
        norm_eval: bool = False,
        stage_min_input_sizes: Sequence[int] | None = None,
    ):
        super().__init__()
        if len(stages) != len(stage_chs) or len(stages) != len(stage_strides):
            raise ValueError("stages, stage_chs and stage_strides must have the same length")
        for name, value, least in (("num_classes", num_classes, 0), ("in_chans", in_chans, 1), ("frozen_stages", frozen_stages, -1)):
            if not _is_int(value) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        self.in_chans = in_chans
        self.stage_min_input_sizes = tuple(stage_min_input_sizes or [1] * len(stages))
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        infos = [FeatureInfo(stem_chs, stem_stride, "stem", 0)]
        reduction = stem_stride
        for i, (chs, stride) in enumerate(zip(stage_chs, stage_strides)):
            reduction *= stride
            infos.append(FeatureInfo(chs, reduction, f"stages.{i}", i + 1))
        check_output_stride(output_stride)
        if output_stride is not None and reduction > output_stride:
            raise OutputStrideError(
                f"output_stride={output_stride}: this network reaches stride {reduction} and cannot dilate its stages; "
                "DenseNet's and PeleeNet's transitions and darknet.cfg's stages downsample by pooling, which has no "
                "dilated form (stages that downsample with a strided convolution can be dilated)")
        self.num_features = infos[-1].num_chs
        self.features_only = features_only
        if out_indices is not None and not features_only:
            raise ValueError("out_indices picks the feature maps of features_only=True; without it the model classifies")
        self.out_indices = tuple(range(len(infos)))
        self.feature_info = FeatureInfoList(infos, self.out_indices)
        if not -1 <= frozen_stages <= len(stages):
            raise ValueError(f"frozen_stages must be in [-1, {len(stages)}], got {frozen_stages}")
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.grad_checkpointing = False
        self.head = None if features_only else ClassifierHead(self.num_features, num_classes, drop_rate)
        self.num_classes = 0 if features_only else num_classes
        self.register_load_state_dict_pre_hook(_skip_deleted_stages)
        if features_only:
            self.keep_levels(self.out_indices if out_indices is None else out_indices)
        self.init_weights()
        self._freeze()

    def keep_levels(self, out_indices: int | Sequence[int]) -> None:
        """Return the feature levels ``out_indices`` (a ``features_only`` model) and delete the stages
        after the deepest of them.

        Those stages would never run: their parameters would get no gradient, which DistributedDataParallel
        refuses, and profiles would count them (timm's features_only models hold no such stages either).
        ``feature_info`` still describes every level. A state dict that holds the deleted stages (a whole
        model's file, a detector checkpoint written before) loads, their tensors skipped. ``out_indices``
        as in timm: level indices (negative counts from the end) or an int ``n``, the last ``n`` levels.
        """
        if not self.features_only:
            raise ValueError("out_indices picks the feature maps of features_only=True; without it the model classifies")
        n = len(self.feature_info)
        if _is_int(out_indices):  # timm's convention: an int n is the last n levels
            if not 1 <= out_indices <= n:
                raise ValueError(f"out_indices={out_indices}: the last n of {n} feature levels needs 1 <= n <= {n}")
            out_indices = tuple(range(n - out_indices, n))
        if not isinstance(out_indices, (tuple, list)) or not all(_is_int(i) for i in out_indices):
            raise ValueError(f"out_indices must be feature level indices (ints) or a count of last levels, got {out_indices!r}")
        if not out_indices:
            raise ValueError("out_indices=() asks for no feature map; name at least one level")
        bad = [i for i in out_indices if not -n <= i < n]
        if bad:
            raise ValueError(f"out_indices {bad} out of range for {n} feature levels")
        out_indices = tuple(i % n for i in out_indices)
        deleted = [i for i in out_indices if i > len(self.stages)]
        if deleted:
            raise ValueError(f"out_indices {deleted}: the stages after level {len(self.stages)} were deleted "
                             f"(out_indices was {self.out_indices}); build the model again to return them")
        self.out_indices = self.feature_info.out_indices = out_indices
        del self.stages[max(out_indices):]
        self.num_features = self.feature_info[len(self.stages)].num_chs  # forward_features ends at the deepest level kept

    @property
    def min_input_size(self) -> int:
        """The smallest image height and width the stages the model holds run on."""
        return max(self.stage_min_input_sizes[:len(self.stages)], default=1)

    @property
    def deleted_stages(self) -> tuple[str, ...]:
        """The names of the stages `keep_levels` deleted (``stages.3`` …), whose levels a state dict may hold."""
        return tuple(info.module for info in self.feature_info[len(self.stages) + 1:])

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    # -- backbone contract -------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if isinstance(x, torch.fx.Proxy):  # torch.fx symbolic tracing: the shape is known only when the graph runs
            return
        if x.dim() != 4:
            raise ValueError(f"expected an image batch of rank 4 (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels, got input of shape {tuple(x.shape)}")
        if min(x.shape[2:]) < self.min_input_size:
            raise ValueError(f"input of shape {tuple(x.shape)} is smaller than this network takes: height and width "
                             f"must be at least {self.min_input_size} (its pools halve maps without padding)")

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            if torch.compiler.is_compiling():
                # torch.compile takes no context_fn but TorchDispatchModes; its recomputation does not update
                # the BatchNorm statistics a second time, so it needs no restoring
                return checkpoint(module, x, use_reentrant=False)
            contexts = partial(_checkpoint_contexts, module)
            return checkpoint(module, x, use_reentrant=False, context_fn=contexts)
        return module(x)

    def forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every feature level the model holds: the stem's output and each stage's."""
        self._check_input(x)
        levels = [self._run(self.stem, x)]
        for stage in self.stages:
            levels.append(self._run(stage, levels[-1]))
        return levels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self._run(self.stem, x)
        for stage in self.stages:
            x = self._run(stage, x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.head is None:
            raise ValueError("this model was built with features_only=True and has no head")
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor):
        if self.features_only:  # the model holds no stage after the deepest level returned (`keep_levels`)
            levels = self.forward_levels(x)
            return [levels[i] for i in self.out_indices]
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The final linear layer (``nn.Identity`` when there is none), as timm models expose it."""
        return self.head.fc if self.head is not None else nn.Identity()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a fresh one with ``num_classes`` outputs (0: pooled features).

        ``global_pool`` is timm's argument: the head pools by average, so ``"avg"`` and ``None`` (keep
        the pooling) are taken and other poolings refused; ``forward_features`` gives the unpooled maps.
        The new head is in the model's mode (eval stays eval: no dropout) and on its device and dtype.
        """
        if not _is_int(num_classes) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
        if self.deleted_stages:
            raise ValueError(f"a classifier reads the last feature level, whose stages this model deleted (out_indices="
                             f"{self.out_indices} stops at level {len(self.stages)}); build it without out_indices")
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool={global_pool!r}: the head pools by average only ('avg', or None to keep it); "
                             "forward_features gives the unpooled maps")
        drop = self.head.drop.p if self.head is not None else 0.0
        like = next(self.stages.parameters())
        self.head = ClassifierHead(self.num_features, num_classes, drop).to(like.device, like.dtype).train(self.training)
        if num_classes > 0:
            nn.init.normal_(self.head.fc.weight, 0, 0.01)
            nn.init.zeros_(self.head.fc.bias)
        self.num_classes = num_classes
        self.features_only = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute stage activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable

    # -- freezing, as detection frameworks use it -----------------------------------------------
    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.stem] + list(self.stages[: self.frozen_stages])

    def _freeze(self) -> None:
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self
