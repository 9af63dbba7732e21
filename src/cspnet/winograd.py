"""Winograd convolution of 3×3, stride-1 layers for deploy mode on the CPU.

F(m×m, 3×3) computes each m×m block of outputs from an (m+2)×(m+2) tile of input (Lavin &
Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016). It transforms each
input tile (``V = Bᵀ d B``) and each filter (``U = G g Gᵀ``) to (m+2)² points, multiplies
point by point summing over input channels, and transforms back (``Y = Aᵀ M A``). The sum
over channels at one point is a matrix product ``[tiles × C] @ [C × K]``, so a layer becomes
(m+2)² GEMMs with (m+2)² / (9 m²) of the direct convolution's multiplications: 0.44 for
F(2×2, 3×3), 0.25 for F(4×4, 3×3).

Why it pays here: on this project's CPU the direct oneDNN convolution already runs near the
FMA peak (docs/benchmarks.md), so fewer multiplications is the one way left to go faster. The
GEMMs run at ~180-205 GFLOP/s (oneDNN matmul, weights pre-packed) against the direct kernel's
~230, and the transforms cost memory passes, so a layer gains only where it has many channels
and enough tiles per GEMM (`choose_algorithm`; benchmarks/winograd_layers.py measures it).

The transforms are sums over strided views. They are compiled by ``torch.compile`` (inductor),
which fuses each into one or two passes; eagerly they are ~40 small strided kernels that cost
more than they save. Each layer shape compiles once (seconds; inductor caches the code on disk), which
is why this is opt-in: ``deploy(model, winograd=True)``.

Numerics, measured against a float64 convolution, relative to the output's scale: the direct
float32 kernel errs ~1.5e-6, F(2×2, 3×3) ~5e-7 (its transform coefficients are 0, ±1, ±½,
exact in binary), F(4×4, 3×3) ~1e-5 (its points ±2 bring coefficients up to 8 and 1/24).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class WinogradAlgorithm:
    """F(m×m, 3×3): its three transform matrices, from Lavin & Gray (2016)."""

    name: str
    input_transform: tuple[tuple[float, ...], ...]  # Bᵀ, (m+2) × (m+2)
    filter_transform: tuple[tuple[float, ...], ...]  # G, (m+2) × 3
    output_transform: tuple[tuple[float, ...], ...]  # Aᵀ, m × (m+2)
    # Compile each transform as one pass (rows and columns fused) or two. Fused, inductor
    # recomputes each row sum inside every column sum that reads it: cheapest for F(2×2),
    # whose sums have at most 2 terms; 3-4× slower than two passes for F(4×4)'s.
    one_pass_transforms: bool

    @property
    def step(self) -> int:
        """m: the side of the output block one tile gives; tiles overlap by 2."""
        return len(self.output_transform)

    @property
    def tile(self) -> int:
        return len(self.input_transform)


F2x2 = WinogradAlgorithm(
    "F(2x2,3x3)",
    input_transform=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
    filter_transform=((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
    output_transform=((1, 1, 1, 0), (0, 1, -1, -1)),
    one_pass_transforms=True,
)
F4x4 = WinogradAlgorithm(
    "F(4x4,3x3)",
    input_transform=(
        (4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
        (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1),
    ),
    filter_transform=(
        (1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
        (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1),
    ),
    output_transform=((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)),
    one_pass_transforms=False,
)

# When a layer gains (batch 8 and 1, 224 px, benchmarks/winograd_layers.py):
# - widths: the transforms cost ∝ C + K per pixel and the saved multiplications ∝ C·K, so
#   C·K / (C + K) must reach MIN_WIDTH: 64→128 (43) gains 1.1×, 64→64 (32) 1.04× at best,
#   32→64 loses;
# - GEMM rows (batch × tiles) must reach MIN_ROWS: at batch 1 no layer gains more than 4 %,
#   the GEMMs being too short for their (m+2)² weight matrices;
# - the map must divide into whole tiles: a 7×7 map in 2×2 blocks wastes 31 % on padding and
#   lost at batch 8. F(4×4) where the side divides by 4 (28, 56), else F(2×2) (14).
MIN_WIDTH = 40
MIN_ROWS = 384


def eligible(conv: nn.Conv2d) -> bool:
    """A 3×3 conv with stride 1, padding 1, no dilation or groups, zero padding."""
    return (
        conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
        and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
    )


def wide_enough(in_chs: int, out_chs: int) -> bool:
    """Whether a layer has the widths to gain from Winograd at any input size (``MIN_WIDTH``)."""
    return in_chs * out_chs >= MIN_WIDTH * (in_chs + out_chs)


def choose_algorithm(batch: int, height: int, width: int) -> WinogradAlgorithm | None:
    """The algorithm that beats the direct kernel on this input size, or None (see ``MIN_ROWS``)."""
    for algorithm in (F4x4, F2x2):
        m = algorithm.step
        if height % m == 0 and width % m == 0:
            return algorithm if batch * (height // m) * (width // m) >= MIN_ROWS else None
    return None


def _combine(coefficients, terms):
    """``Σ cᵢ·tᵢ`` over the nonzero coefficients, with no multiplication for ±1."""
    total = None
    for c, t in zip(coefficients, terms):
        if c == 0:
            continue
        term = t if c == 1 else -t if c == -1 else c * t
        total = term if total is None else total + term
    return total


def transform_weight(weight: torch.Tensor, algorithm: WinogradAlgorithm) -> torch.Tensor:
    """``[K, C, 3, 3]`` filters → ``[(m+2)², K, C]``: ``G g Gᵀ`` at each point (computed in float64)."""
    g = torch.tensor(algorithm.filter_transform, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ai,kcij,bj->abkc", g, weight.detach().double(), g)
    return u.reshape(algorithm.tile**2, weight.shape[0], weight.shape[1]).to(weight.dtype).contiguous()


def _row_mix(x: torch.Tensor, algorithm: WinogradAlgorithm) -> list[torch.Tensor]:
    """``Bᵀ d`` for every tile row of the zero-padded input: m+2 maps ``[N, H/m, W+2, C]``."""
    m, tile, h = algorithm.step, algorithm.tile, x.shape[2]
    padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # NHWC view of channels-last memory
    rows = [padded[:, i : i + h : m] for i in range(tile)]
    return [_combine(coefficients, rows) for coefficients in algorithm.input_transform]


def _input_points(row_mix: list[torch.Tensor], algorithm: WinogradAlgorithm) -> list[torch.Tensor]:
    """``(Bᵀ d) B`` from `_row_mix`: (m+2)² matrices ``[N·tiles, C]``, one per point."""
    m, tile = algorithm.step, algorithm.tile
    c, w = row_mix[0].shape[3], row_mix[0].shape[2] - 2
    points = []
    for row in row_mix:
        cols = [row[:, :, j : j + w : m] for j in range(tile)]
        points += [_combine(coefficients, cols).reshape(-1, c) for coefficients in algorithm.input_transform]
    return points


def _post_op(y: torch.Tensor, attr: str, scalars: list[float]) -> torch.Tensor:
    # The activations `export.OneDnnConvAct` runs in oneDNN's epilogue, by the same names.
    if attr == "none":
        return y
    if attr == "relu":
        return F.relu(y)
    if attr == "leaky_relu":
        return F.leaky_relu(y, scalars[0])
    if attr == "swish":
        return F.silu(y)
    if attr == "hardtanh":
        return y.clamp(scalars[0], scalars[1])
    if attr == "sigmoid":
        return torch.sigmoid(y)
    raise ValueError(f"unknown post-op {attr!r}")


def _output_rows(products: list[torch.Tensor], algorithm: WinogradAlgorithm) -> list[torch.Tensor]:
    """``Aᵀ M``: the (m+2)² products ``[N·tiles, K]``, point-major → m·(m+2) sums, row-major."""
    tile = algorithm.tile
    return [
        _combine(coefficients, products[j::tile]) for coefficients in algorithm.output_transform for j in range(tile)
    ]


def _output(
    rows: list[torch.Tensor], bias: torch.Tensor | None, shape: tuple[int, int, int, int],
    algorithm: WinogradAlgorithm, attr: str, scalars: list[float],
) -> torch.Tensor:
    """``(Aᵀ M) A`` + bias + activation: `_output_rows` → the ``[N, K, H, W]`` output, channels-last."""
    n, k, h, w = shape
    m, tile = algorithm.step, algorithm.tile
    rows = [r.view(n, h // m, w // m, k) for r in rows]
    blocks = [
        torch.stack([_combine(coefficients, rows[i * tile : (i + 1) * tile]) for coefficients in algorithm.output_transform], dim=3)
        for i in range(m)
    ]  # block row i: [N, H/m, W/m, m, K]
    y = torch.stack(blocks, dim=2).reshape(n, h, w, k)
    if bias is not None:
        y = y + bias
    return _post_op(y, attr, scalars).permute(0, 3, 1, 2)


def _input_transform(x: torch.Tensor, algorithm: WinogradAlgorithm) -> list[torch.Tensor]:
    return _input_points(_row_mix(x, algorithm), algorithm)


def _output_transform(
    products: list[torch.Tensor], bias: torch.Tensor | None, shape: tuple[int, int, int, int],
    algorithm: WinogradAlgorithm, attr: str, scalars: list[float],
) -> torch.Tensor:
    return _output(_output_rows(products, algorithm), bias, shape, algorithm, attr, scalars)


@functools.cache
def _compiled(fn):
    # Compiled on first use: importing torch.compile's machinery costs ~1 s. Static shapes:
    # inductor's kernels for symbolic shapes measured 15-25 % slower.
    return torch.compile(fn, dynamic=False)


# Every layer shape is a recompilation of the same two functions; allow a few networks' worth.
RECOMPILE_LIMIT = 256


class PackedFrom:
    """The weights a packed copy was made from, to tell when the copy is stale.

    Stale when the weight tensor was changed in place (``load_state_dict`` and in-place edits under
    ``torch.no_grad()`` move its version counter) or was given other memory: ``p.data = …``
    (``torch.nn.utils.vector_to_parameters``) changes neither the Parameter nor its version. An in-place
    edit through ``p.data`` (``p.data.copy_(q)``) is not seen: ``.data`` is a tensor with its own version
    counter; `cspnet.export.DeployedModel.repack` drops the copies after such an edit. This holds the
    packed-from tensor, so that no new weights can be allocated at its address while the copy is in use
    (the old weights stay in memory until the layer packs the new ones).
    """

    def __init__(self, weight: torch.Tensor):
        self.source = weight.detach()
        self.version = weight._version

    def matches(self, weight: torch.Tensor) -> bool:
        return weight.data_ptr() == self.source.data_ptr() and weight._version == self.version


class WinogradConvAct(nn.Module):
    """A 3×3 stride-1 `OneDnnConvAct` computed by Winograd where `choose_algorithm` says it gains.

    Keeps the layer it replaces and runs it for every other input: batch sizes and map sizes
    where Winograd loses, autograd, other devices or dtypes.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        conv = layer.layer.conv
        if not eligible(conv):
            raise ValueError(f"Winograd needs a 3x3, stride-1, padding-1 ungrouped conv, got {conv}")
        self.layer = layer
        self._packed: dict[str, list[torch.Tensor]] = {}  # algorithm name → packed GEMM weights
        self._packed_from: PackedFrom | None = None

    def drop_packed(self) -> None:
        """Forget the transformed weights: the next call transforms the current ones again."""
        self._packed, self._packed_from = {}, None

    def _apply(self, fn, recurse=True):
        self.drop_packed()  # moved or cast: transform again from the new weights
        return super()._apply(fn, recurse)

    def packed_weights(self, algorithm: WinogradAlgorithm, rows: int) -> list[torch.Tensor]:
        """The transformed filters, one ``[K, C]`` matrix per point, in oneDNN's GEMM layout."""
        weight = self.layer.layer.conv.weight
        if self._packed_from is None or not self._packed_from.matches(weight):  # new or changed weights: all stale
            self._packed, self._packed_from = {}, PackedFrom(weight)
        if algorithm.name not in self._packed:
            points = transform_weight(self.layer.layer.conv.weight, algorithm)
            self._packed[algorithm.name] = [torch.ops.mkldnn._reorder_linear_weight(u, rows) for u in points]
        return self._packed[algorithm.name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        algorithm = choose_algorithm(x.shape[0], x.shape[2], x.shape[3])
        if algorithm is None or not self.layer.fast_path(x):
            return self.layer(x)
        return self.run(x, algorithm)

    def run(self, x: torch.Tensor, algorithm: WinogradAlgorithm) -> torch.Tensor:
        """The layer by ``algorithm``, whatever the rules say: CPU float32 inference, sides divisible by m."""
        n, _, h, w = x.shape
        if h % algorithm.step or w % algorithm.step:
            raise ValueError(f"{algorithm.name} needs map sides divisible by {algorithm.step}, got {h}x{w}")
        conv = self.layer.layer.conv
        rows = n * (h // algorithm.step) * (w // algorithm.step)
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, accumulated_recompile_limit=4 * RECOMPILE_LIMIT):
            if algorithm.one_pass_transforms:
                points = _compiled(_input_transform)(x, algorithm)
            else:
                points = _compiled(_input_points)(_compiled(_row_mix)(x, algorithm), algorithm)
            products = [
                torch.ops.mkldnn._linear_pointwise(v, u, None, "none", [], "")
                for v, u in zip(points, self.packed_weights(algorithm, rows))
            ]
            shape = (n, conv.out_channels, h, w)
            post_op = (self.layer.attr, self.layer.scalars)
            if algorithm.one_pass_transforms:
                return _compiled(_output_transform)(products, conv.bias, shape, algorithm, *post_op)
            row_sums = _compiled(_output_rows)(products, algorithm)
            return _compiled(_output)(row_sums, conv.bias, shape, algorithm, *post_op)
