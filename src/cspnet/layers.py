"""Small building blocks shared by every model family.

`ConvBnAct` is the Darknet ``[convolutional]`` section with ``batch_normalize=1``: a bias-free
convolution, BatchNorm and an activation. Activations are named as in the Darknet cfgs
(``leaky`` is LeakyReLU with slope 0.1, as darknet's ``leaky_activate``; ``leaky_0.01`` is
PyTorch's default slope, which timm's ``leaky_relu`` models were trained with).
"""
from __future__ import annotations

import contextlib
import difflib
import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import (  # hooks registered with register_module_forward_(pre_)hook
    _global_forward_hooks,
    _global_forward_pre_hooks,
)
from torch.utils.weak import WeakIdKeyDictionary

ACTIVATIONS = ("leaky", "leaky_0.01", "mish", "swish", "relu", "relu6", "logistic", "linear")
# Aliases users reach for; each maps onto one of ACTIVATIONS.
_ALIASES = {"silu": "swish", "leaky_relu": "leaky", "identity": "linear", "sigmoid": "logistic", "none": "linear"}


def fx_leaf(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Decorator for the ``forward`` of a module that decides at run time how it computes (in place or
    not, memory-efficient or not, by its input's shape, whether autograd records, whether a hook looks).

    ``torch.fx.symbolic_trace`` cannot record such branches: it records the module as one
    ``call_module`` node instead, as it does torch.nn's modules (FX's *leaf modules*), so neither it
    nor torchvision's ``create_feature_extractor`` needs ``leaf_modules``. The traced graph calls the
    module, which decides as it does in the model. While FX traces, the input is a ``torch.fx.Proxy``.
    """

    @functools.wraps(forward)
    def leaf_forward(self: nn.Module, x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):
            tracer = x.tracer
            path = tracer.path_of_module(self)
            if not path:  # the module being traced is this one: a graph of one node calling itself
                raise TypeError(f"{type(self).__name__} is traced as one node of a larger model; "
                                "torch.fx.symbolic_trace the model (or block) that contains it")
            return tracer.create_proxy("call_module", path, (x, *args), {})
        return forward(self, x, *args)

    return leaf_forward


def contiguous_like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t``, a channel slice of ``ref``, made dense in ``ref``'s memory format (NCHW or channels-last).

    A channel slice of either format is strided; timm hit CUDA crashes with ``chunk()`` under
    channels-last for this reason (its commit 7ef7788e).
    """
    if ref.is_contiguous(memory_format=torch.channels_last) and not ref.is_contiguous():
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


def canonical_act(name: str) -> str:
    """Return the canonical activation name, or raise ValueError with close matches."""
    if not isinstance(name, str):
        raise ValueError(f"activation must be a name, got {type(name).__name__}")
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in ACTIVATIONS:
        close = difflib.get_close_matches(key, ACTIVATIONS + tuple(_ALIASES), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown activation {name!r}{hint} (known: {', '.join(ACTIVATIONS)})")
    return key


def make_act(name: str) -> nn.Module:
    """Build the activation module for a Darknet activation name."""
    key = canonical_act(name)
    if key == "leaky":
        return nn.LeakyReLU(0.1, inplace=True)
    if key == "leaky_0.01":
        return nn.LeakyReLU(0.01, inplace=True)
    if key == "mish":
        return nn.Mish(inplace=True)
    if key == "swish":
        return nn.SiLU(inplace=True)
    if key == "relu":
        return nn.ReLU(inplace=True)
    if key == "relu6":
        return nn.ReLU6(inplace=True)
    if key == "logistic":
        return nn.Sigmoid()
    return nn.Identity()


class ConvOutputBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` for the output of the convolution just before it (`ConvBnAct`), with an
    in-place form for that output.

    Called as a module it is exactly ``nn.BatchNorm2d`` (its parameters and buffers are the same, so
    state dicts, converters and BN folding see a plain BatchNorm2d). `ConvBnAct`, which owns the
    fresh conv output, normalizes a large map in place in eval mode with no autograd graph recorded
    (`normalize_in_place`: ``x * scale + shift`` with per-channel factors, equal to
    ``nn.BatchNorm2d`` up to float rounding, ~3e-7 relative), so the conv+BN pair allocates one such
    map, not two.
    """

    # Why only large maps: glibc serves allocations below its mmap threshold (adaptive, up to
    # 32 MiB) from reused heap memory, where a new output costs nothing and the native kernel's
    # one pass beats the two in-place passes; larger ones are fresh pages, faulted in on every
    # call. Measured interleaved with timm (2 threads, 224 px): in place everywhere was ~4 %
    # faster at batch 8 but 3-10 % slower at batch 1; with this threshold (16 MiB of float32)
    # both batch sizes get the faster form.
    IN_PLACE_MIN_NUMEL = 1 << 22

    def can_normalize_in_place(self, x: torch.Tensor) -> bool:
        """Eval mode, no autograd recording, running statistics and affine factors, a large map."""
        return not (
            self.training or torch.is_grad_enabled() or self.running_mean is None or not self.affine
            or x.numel() < self.IN_PLACE_MIN_NUMEL
        )

    def normalize_in_place(self, x: torch.Tensor) -> torch.Tensor:
        """Overwrite ``x`` with its eval-mode normalization; for a map nothing else reads."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return x.mul_(scale.view(1, -1, 1, 1)).add_(shift.view(1, -1, 1, 1))


def hooked(*modules: nn.Module, include_global: bool = True) -> bool:
    """Whether a forward hook or pre-hook of the modules (or, with ``include_global``, a global one)
    could see the maps passing through ``modules`` (and keep them)."""
    return (include_global and bool(_global_forward_hooks or _global_forward_pre_hooks)) or any(
        m._forward_hooks or m._forward_pre_hooks for m in modules)


# Memory-efficient training (`memory_efficient`). Autograd normally keeps two maps per Conv-BN-act
# layer: the conv output (BatchNorm's backward reads it) and the activation output (read by the
# activation's backward and by the next conv's weight gradient). In memory-efficient mode a layer
# keeps only the conv output; its activation output is handed to autograd as a `Recompute`, one
# per-channel multiply-add and the activation away from that kept map, and rebuilt when a backward
# step needs it. Concatenations (the CSP stage's fusion, a dense block's running concat) are
# recomputed the same way from their parts, so a DenseNet keeps its layers' outputs once instead
# of every concat of them. The cost is a few elementwise passes (and concats) per layer in the
# backward pass; convolutions never rerun.


class Recompute:
    """How to rebuild a tensor for the backward pass from tensors autograd keeps anyway.

    An argument that is itself a `Recompute` is rebuilt first (a BN-act output over a concat). A
    tensor argument changed in place since then would rebuild something else: that raises, as
    autograd does for a saved tensor.
    """

    def __init__(self, version: int, fn: Callable[..., torch.Tensor], *args: object):
        self.version, self.fn, self.args = version, fn, args
        self.arg_versions = [a._version if isinstance(a, torch.Tensor) else None for a in args]

    def __call__(self) -> torch.Tensor:
        for a, v in zip(self.args, self.arg_versions):
            if v is not None and a._version != v:
                raise RuntimeError(
                    f"a {tuple(a.shape)} tensor needed to rebuild a memory-efficient layer's output for backward "
                    f"was modified in place (version {v} -> {a._version}); do not modify it, or train without "
                    "cspnet.memory_efficient")
        return self.fn(*(a() if isinstance(a, Recompute) else a for a in self.args))


# Tensors produced in memory-efficient mode -> how to rebuild them. Weak keys: an entry goes when
# its tensor does, which is right after the forward pass unless someone else holds it.
_RECOMPUTABLE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _recipe(t: torch.Tensor) -> Recompute | None:
    recipe = _RECOMPUTABLE.get(t)
    # A tensor changed in place since it was made is no longer what its recipe rebuilds.
    return recipe if recipe is not None and recipe.version == t._version else None


def _recipe_or_tensor(t: torch.Tensor) -> Recompute | torch.Tensor:
    return _recipe(t) or t.detach()


def _pack_recomputable(t: torch.Tensor) -> torch.Tensor | Recompute:
    return _recipe(t) or t


def _unpack_recomputable(saved: torch.Tensor | Recompute) -> torch.Tensor:
    return saved() if isinstance(saved, Recompute) else saved


def saving_recipes(enabled: bool = True) -> contextlib.AbstractContextManager:
    """Context in which autograd saves a recomputable tensor as its recipe (a null context if not ``enabled``)."""
    if not enabled:
        return _NO_HOOKS
    return torch.autograd.graph.saved_tensors_hooks(_pack_recomputable, _unpack_recomputable)


_NO_HOOKS = contextlib.nullcontext()  # reusable: the plain path makes no context per call


def _cat_parts(dim: int, *parts: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts, dim=dim)


def recomputable_cat(tensors: Sequence[torch.Tensor], dim: int = 1, memory_efficient: bool = False) -> torch.Tensor:
    """``torch.cat``; with ``memory_efficient`` the result is rebuilt from its parts when needed.

    A part that is recomputable is rebuilt too; any other part is held by the recipe, which costs
    nothing when that part is kept anyway and less than the concat in any case.
    """
    out = torch.cat(list(tensors), dim=dim)
    if memory_efficient and torch.is_grad_enabled():
        _RECOMPUTABLE[out] = Recompute(out._version, _cat_parts, dim, *(_recipe_or_tensor(t) for t in tensors))
    return out


def _bn_scale_shift(weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = weight * invstd
    return scale.view(1, -1, 1, 1), (bias - mean * scale).view(1, -1, 1, 1)


def _affine_act(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, act: nn.Module) -> torch.Tensor:
    # The activation modules work in place: the multiply-add's output is fresh.
    return act(torch.addcmul(shift, x, scale))


# The derivative of each activation at its input z, as the aten backward kernels autograd uses
# (``linear`` layers, `nn.Identity`, pass the gradient through and need no z).
_ACT_BACKWARD: dict[type[nn.Module], Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    nn.LeakyReLU: lambda act, grad, z: torch.ops.aten.leaky_relu_backward(grad, z, act.negative_slope, False),
    nn.ReLU: lambda act, grad, z: torch.ops.aten.threshold_backward(grad, z, 0),
    nn.ReLU6: lambda act, grad, z: torch.ops.aten.hardtanh_backward(grad, z, 0.0, 6.0),
    nn.Mish: lambda act, grad, z: torch.ops.aten.mish_backward(grad, z),
    nn.SiLU: lambda act, grad, z: torch.ops.aten.silu_backward(grad, z),
    nn.Sigmoid: lambda act, grad, z: torch.ops.aten.sigmoid_backward(grad, torch.sigmoid(z)),
}


class _BatchNormActKeepingInput(torch.autograd.Function):
    """Training-mode BatchNorm then activation, saving only the BatchNorm input for backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float, eps: float, act: nn.Module):
        out, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.eps, ctx.act = eps, act
        ctx.mark_non_differentiable(mean, invstd)
        return act(out), mean, invstd

    @staticmethod
    def backward(ctx, grad, _grad_mean, _grad_invstd):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        if type(ctx.act) is not nn.Identity:
            scale, shift = _bn_scale_shift(weight, bias, mean, invstd)
            grad = _ACT_BACKWARD[type(ctx.act)](ctx.act, grad, torch.addcmul(shift, x, scale))
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, ctx.eps, list(ctx.needs_input_grad[:3]))
        return grad_x, grad_w, grad_b, None, None, None, None, None


def _recomputes(bn: nn.Module, act: nn.Module, x: torch.Tensor) -> bool:
    """Whether `bn_act` can take the memory-efficient path for this BatchNorm, activation and input."""
    return (
        bn.training and torch.is_grad_enabled()
        # A BatchNorm swapped for another kind (SyncBatchNorm: statistics over all processes) runs as is.
        and isinstance(bn, nn.BatchNorm2d) and bn.affine and bn.track_running_stats
        and x.dtype == bn.weight.dtype  # autocast: keep the plain path's dtype handling
        and (type(act) is nn.Identity or type(act) in _ACT_BACKWARD)
    )


def bn_act(x: torch.Tensor, bn: nn.Module, act: nn.Module, memory_efficient: bool = False) -> torch.Tensor:
    """``act(bn(x))``; with ``memory_efficient``, keeping only ``x`` for backward (or its recipe).

    The output is registered as recomputable from ``x``. The BatchNorm's own mode decides the path,
    so ``norm_eval`` backbones (BatchNorm in eval mode while training) take the plain one.
    """
    if not (memory_efficient and _recomputes(bn, act, x)):
        return act(bn(x))
    bn.num_batches_tracked.add_(1)
    momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    with saving_recipes():  # an x that is itself recomputable (a concat) is saved as its recipe
        y, mean, invstd = _BatchNormActKeepingInput.apply(
            x, bn.weight, bn.bias, bn.running_mean, bn.running_var, momentum, bn.eps, act)
    scale, shift = _bn_scale_shift(bn.weight.detach(), bn.bias.detach(), mean, invstd)
    _RECOMPUTABLE[y] = Recompute(y._version, _affine_act, _recipe_or_tensor(x), scale, shift, act)
    return y


class ConvBnAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> activation, with Darknet's 'same' padding (k // 2).

    With ``memory_efficient`` set (see `memory_efficient`), a forward pass that records autograd
    with the BatchNorm in training mode keeps only the conv output for backward and recomputes the
    activation output.
    """

    memory_efficient = False

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        act: str = "leaky",
        dilation: int = 1,
    ):
        padding = dilation * (kernel_size // 2)
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, dilation=dilation, groups=groups, bias=False)
        self.bn = ConvOutputBatchNorm2d(out_chs)
        self.act = make_act(act)
        self.in_chs, self.out_chs = in_chs, out_chs

    @fx_leaf
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.memory_efficient:
            y = self.conv(x)
            # the conv output is fresh and read by the BN alone, unless a hook on either sees it
            in_place = isinstance(self.bn, ConvOutputBatchNorm2d) and self.bn.can_normalize_in_place(y)  # not a swapped-in BN
            if in_place and not hooked(self.conv, self.bn):
                return self.act(self.bn.normalize_in_place(y))
            return self.act(self.bn(y))
        with saving_recipes():  # the input, if recomputable, is saved as its recipe
            x = self.conv(x)
        return bn_act(x, self.bn, self.act, memory_efficient=True)


def memory_efficient(model: nn.Module, enabled: bool = True) -> int:
    """Switch memory-efficient training on (or off) in every module of ``model`` that has it.

    Those modules declare a ``memory_efficient`` class attribute: `ConvBnAct`, `CrossStage`, the
    DenseNet layers and the detector necks' fusion steps. A BatchNorm + activation then keeps only
    its input for backward, and activation outputs and concatenations are rebuilt from what is
    kept (see the comment above `Recompute`); gradients equal the plain path's to float rounding. Returns the number of modules switched. At run time
    a BatchNorm in eval mode, one without running statistics or affine parameters, another kind
    of BatchNorm (SyncBatchNorm) and autocast take the plain path.
    """
    switched = 0
    for module in model.modules():
        if hasattr(type(module), "memory_efficient"):
            module.memory_efficient = enabled
            switched += 1
    return switched


def darknet_add(x: torch.Tensor, shortcut: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Darknet's ``[shortcut]``: add ``shortcut`` into ``x`` over min(C_x, C_s) channels.

    The result keeps ``x``'s shape; with ``inplace`` it is ``x`` itself whenever the add covers
    all of ``x``'s channels. A larger shortcut map is subsampled with stride
    ``H_s / H_x`` (darknet ``shortcut_cpu``), which is how the plain ResNet cfgs make the
    first block of a stride-2 stage residual without a projection conv; a shortcut with fewer
    channels is a *partial residual* (csresnet50 stage 1, paper §4.2, CSPNet issue #13).
    The stride is Darknet's integer ratio: with input sides that are multiples of 32 it is exactly 2;
    with odd sides (a 57 map onto a 29 one) it is 1 and the top-left part is added, as Darknet does.
    """
    if x.shape == shortcut.shape:
        return x.add_(shortcut) if inplace else x + shortcut
    if shortcut.shape[2] != x.shape[2] or shortcut.shape[3] != x.shape[3]:
        step_h, step_w = shortcut.shape[2] // x.shape[2], shortcut.shape[3] // x.shape[3]
        if step_h < 1 or step_w < 1 or step_h != step_w:
            raise ValueError(f"shortcut of shape {tuple(shortcut.shape)} cannot be added to {tuple(x.shape)}: Darknet's "
                             "[shortcut] needs the same whole ratio of heights and of widths (input sides that are "
                             "multiples of 32 always work)")
        shortcut = shortcut[:, :, ::step_h, ::step_w][:, :, : x.shape[2], : x.shape[3]]
    c_x, c_s = x.shape[1], shortcut.shape[1]
    if c_s >= c_x:
        shortcut = shortcut[:, :c_x]
        return x.add_(shortcut) if inplace else x + shortcut
    return torch.cat([x[:, :c_s] + shortcut, x[:, c_s:]], dim=1)


class Shortcut(nn.Module):
    """A residual add as a module (Darknet ``[shortcut]``), so that profilers can see it.

    With ``inplace=True`` (as ``nn.ReLU``) the sum is written into ``x``: the block passes a fresh
    conv output that nothing else reads. Skipping one block-sized allocation per block is
    measurably faster on CPU, where each large allocation is freshly ``mmap``-ed, zeroed memory.
    ``x_saved_for_backward=True`` says that the layer which made ``x`` keeps it for its backward
    pass (a leaky ReLU keeps its output), so the add is in place only while no autograd graph is
    being recorded (``torch.no_grad``, ``inference_mode``).
    """

    def __init__(self, inplace: bool = False, x_saved_for_backward: bool = False):
        super().__init__()
        self.inplace = inplace
        self.x_saved_for_backward = x_saved_for_backward

    @fx_leaf
    def forward(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        inplace = self.inplace and not (self.x_saved_for_backward and torch.is_grad_enabled())
        return darknet_add(x, shortcut, inplace=inplace)


class Maxout(nn.Module):
    """Maxout over channels (Darknet ``[maxpool] maxpool_depth=1 out_channels=N``).

    Output channel g is the max over input channels g, g+N, g+2N, ... (darknet
    ``forward_maxpool_layer``); EFM uses it to compress pyramid maps before concatenation.
    """

    def __init__(self, out_chs: int):
        super().__init__()
        self.out_chs = out_chs

    @fx_leaf  # it pads by the channel count of the map it gets
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if c % self.out_chs:
            # Channels past the last full group take part only in their own group's max: pad with -inf.
            pad = self.out_chs - c % self.out_chs
            x = torch.cat([x, x.new_full((n, pad, h, w), float("-inf"))], dim=1)
            c = x.shape[1]
        return x.view(n, c // self.out_chs, self.out_chs, h, w).amax(dim=1)


class SPP(nn.Module):
    """Spatial pyramid pooling as in YOLOv3-SPP: concat [max13, max9, max5, identity] (stride 1)."""

    def __init__(self, kernel_sizes: tuple[int, ...] = (5, 9, 13)):
        super().__init__()
        self.kernel_sizes = kernel_sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pools = [F.max_pool2d(x, k, 1, k // 2) for k in reversed(self.kernel_sizes)]
        return torch.cat(pools + [x], dim=1)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation channel attention (used by the SE PeleeNet variants)."""

    def __init__(self, chs: int, reduction: int = 4, act: str = "relu"):
        super().__init__()
        hidden = max(8, chs // reduction)
        self.fc1 = nn.Conv2d(chs, hidden, 1)
        self.act = make_act(act)
        self.fc2 = nn.Conv2d(hidden, chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(s))))


class ClassifierHead(nn.Module):
    """Global average pool -> dropout -> linear (the cfgs' ``[avgpool]`` + 1x1 ``[convolutional]``).

    A 1x1 convolution on a pooled 1x1 map is a linear layer; ``nn.Linear`` holds the same
    ``C_out x C_in`` weights and bias, so Darknet weights map onto it by a reshape.
    """

    def __init__(self, in_chs: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.in_chs = in_chs
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        if pre_logits:
            return x
        return self.fc(self.drop(x))
