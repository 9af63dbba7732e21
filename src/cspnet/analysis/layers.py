"""The computational-bottleneck profile (paper §4.5, Fig. 7): BFLOPs and CIO of every layer along the depth.

The paper plots the BFLOPs of each layer of PeleeNet, PeleeNet-PRN and CSPPeleeNet-EFM and reads the
bottleneck off the peak: CSPNet "cuts the computational bottleneck" by sending only part 2 of a
stage through its heavy layers. Here a *layer* is one convolution or linear layer as the profiler
sees it (`cspnet.profile`, one batch-1 forward pass); its BFLOPs are Darknet's, 2 x multiply-adds /
1e9, and its CIO is the number of input plus output elements of a convolution (HarDNet's
memory-traffic measure counts convolutions only; a linear layer's CIO is 0).
BatchNorm, activations and pooling carry no multiply-adds in Darknet's count and are left out, so the
layers' BFLOPs and CIO sum exactly to the profiler's totals.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..profile import profile
from ..registry import create_model
from ..files import atomic_savefig, atomic_write_text
from .common import twin_pair


@dataclass(frozen=True)
class LayerCost:
    index: int
    name: str
    kind: str
    out_shape: tuple[int, ...]
    macs: int
    bflops: float
    cio: int


@dataclass(frozen=True)
class LayerProfileSummary:
    """One model's per-layer costs, totals and the layers where BFLOPs and CIO peak."""

    model: str
    input_size: int
    params: int
    bflops: float
    cio: int
    layers: list[LayerCost]

    @property
    def peak_bflops(self) -> LayerCost:
        return max(self.layers, key=lambda layer: layer.bflops)

    @property
    def peak_cio(self) -> LayerCost:
        return max(self.layers, key=lambda layer: layer.cio)

    def as_dict(self) -> dict:
        return {
            "model": self.model, "input_size": self.input_size, "params": self.params, "bflops": self.bflops,
            "cio": self.cio, "peak_bflops": asdict(self.peak_bflops), "peak_cio": asdict(self.peak_cio),
            "layers": [asdict(layer) for layer in self.layers],
        }


def layer_costs(model, input_size: int, in_chans: int | None = None, name: str = "") -> LayerProfileSummary:
    """BFLOPs and CIO of every convolution / linear layer of ``model``, in execution order."""
    prof = profile(model, input_size, in_chans)
    rows = [layer for layer in prof.layers if layer.macs > 0 or layer.cio > 0]
    layers = [LayerCost(i, r.name, r.kind, r.out_shape, r.macs, 2 * r.macs / 1e9, r.cio) for i, r in enumerate(rows)]
    if not layers:
        raise ValueError(f"model {name or type(model).__name__} has no convolution or linear layer to profile")
    return LayerProfileSummary(name or getattr(model, "model_name", type(model).__name__), prof.input_size[0],
                               prof.params, prof.bflops, prof.cio, layers)


def plot_layer_costs(summaries: list[LayerProfileSummary], path: Path) -> Path:
    """Per-layer BFLOPs (top) and CIO (bottom) along the depth, one line per model, peaks marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_f, ax_c) = plt.subplots(2, 1, figsize=(11, 7), sharex=False)
    for s in summaries:
        x = [layer.index for layer in s.layers]
        for ax, key, scale, unit in ((ax_f, "bflops", 1.0, "BFLOPs"), (ax_c, "cio", 1e-6, "M")):
            peak = s.peak_bflops if key == "bflops" else s.peak_cio
            py = getattr(peak, key) * scale
            label = f"{s.model}: total {getattr(s, key) * scale:.3f} {unit}; peak {py:.4g} at {peak.name}"
            (line,) = ax.plot(x, [getattr(layer, key) * scale for layer in s.layers], marker=".", lw=1, label=label)
            ax.plot([peak.index], [py], marker="o", ms=12, mfc="none", color=line.get_color())
    size = summaries[0].input_size
    ax_f.set(ylabel="BFLOPs per layer", title=f"Computational bottleneck along the depth ({size}x{size} input)")
    ax_c.set(xlabel="layer index (convolutions and linear layers, execution order)", ylabel="CIO per layer (M elements)")
    for ax in (ax_f, ax_c):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return atomic_savefig(fig, path)


def format_layer_report(summaries: list[LayerProfileSummary], top: int = 5) -> str:
    """Markdown: totals and peaks per model, the CSP/plain peak ratio, and each model's heaviest layers."""
    lines = ["| Model | Input | Params | BFLOPs | CIO (M) | Peak-BFLOPs layer | Peak BFLOPs | Peak-CIO layer | Peak CIO (M) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in summaries:
        pf, pc = s.peak_bflops, s.peak_cio
        lines.append(f"| {s.model} | {s.input_size} | {s.params / 1e6:.3f}M | {s.bflops:.4f} | {s.cio / 1e6:.3f} | "
                     f"`{pf.name}` | {pf.bflops:.4f} | `{pc.name}` | {pc.cio / 1e6:.3f} |")
    if len(summaries) == 2:
        a, b = summaries
        lines += ["", f"Peak BFLOPs {a.model} / {b.model}: {a.peak_bflops.bflops / b.peak_bflops.bflops:.3f}; "
                      f"peak CIO: {a.peak_cio.cio / b.peak_cio.cio:.3f}; total BFLOPs: {a.bflops / b.bflops:.3f}; "
                      f"total CIO: {a.cio / b.cio:.3f}."]
    for s in summaries:
        lines += ["", f"Heaviest {top} layers of {s.model}:", "", "| # | Layer | Output | BFLOPs | CIO (M) |",
                  "| --- | --- | --- | --- | --- |"]
        for layer in sorted(s.layers, key=lambda r: -r.bflops)[:top]:
            lines.append(f"| {layer.index} | `{layer.name}` | {'x'.join(map(str, layer.out_shape[1:]))} | "
                         f"{layer.bflops:.4f} | {layer.cio / 1e6:.3f} |")
    return "\n".join(lines) + "\n"


def analyze_layers(model_name: str, out_dir: str | Path, *, input_size: int | None = None, twin: str | None = "auto",
                   in_chans: int = 3, num_classes: int = 1000) -> list[LayerProfileSummary]:
    """Profile ``model_name`` and its twin layer by layer; write ``layers.png``, ``layers.md``, ``layers.json``.

    ``twin="auto"`` takes the registered twin (plain model of a CSP one, or the CSP model whose
    twin this is); ``None`` profiles ``model_name`` alone. ``input_size`` defaults to the model's.
    """
    names, size = twin_pair(model_name, twin, input_size)
    summaries = [layer_costs(create_model(n, num_classes=num_classes, in_chans=in_chans), size, in_chans, n) for n in names]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_layer_costs(summaries, out / "layers.png")
    atomic_write_text(out / "layers.md", f"# Per-layer computational cost: {' vs '.join(names)}\n\n" + format_layer_report(summaries))
    atomic_write_text(out / "layers.json", json.dumps([s.as_dict() for s in summaries], indent=1) + "\n")
    return summaries
