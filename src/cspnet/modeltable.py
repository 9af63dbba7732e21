"""The model table: every registered model measured by the profiler beside the paper's figures."""
from __future__ import annotations

from dataclasses import dataclass

from .profile import profile
from .registry import create_model, get_spec, list_models


@dataclass(frozen=True)
class ModelRow:
    name: str
    family: str
    twin: str | None
    input_size: int
    params: int
    conv_params: int
    bflops: float
    shortcut_adds: int
    cio: int
    paper_params_m: float | None
    paper_bflops: float | None
    paper_source: str | None
    params_decimals: int = 2
    bflops_decimals: int = 2
    params_kind: str = "conv"

    @property
    def compared_params(self) -> int:
        """The parameter count the paper's figure is comparable with (conv weights, or all)."""
        return self.params if self.params_kind == "all" else self.conv_params

    @property
    def bflops_with_shortcuts(self) -> float:
        """BFLOPs as Darknet builds that also count one FLOP per residual-add output print them."""
        return self.bflops + self.shortcut_adds / 1e9

    @property
    def matches_paper(self) -> str | None:
        """``"conv"`` when conv params and conv BFLOPs equal the paper's to its printed precision,
        ``"conv+shortcut"`` when they do once residual adds are counted too, ``""`` when neither."""
        if self.paper_params_m is None and self.paper_bflops is None:
            return None
        digits = self.bflops_decimals
        if self.paper_params_m is not None and round(self.compared_params / 1e6, self.params_decimals) != round(
            self.paper_params_m, self.params_decimals
        ):
            return ""
        if self.paper_bflops is None:
            return "conv"
        if round(self.bflops, digits) == round(self.paper_bflops, digits):
            return "conv"
        if round(self.bflops_with_shortcuts, digits) == round(self.paper_bflops, digits):
            return "conv+shortcut"
        return ""


def model_rows(pattern: str = "*", input_size: int | None = None, with_twins: bool = True) -> list[ModelRow]:
    """Profile every model matching ``pattern`` at its paper input size (or ``input_size``).

    With ``with_twins`` the plain twin of every matching CSP model is profiled too, so that
    the table can show CSP/plain ratios.
    """
    names = list_models(pattern)
    if with_twins:
        names += sorted({t for n in names if (t := get_spec(n).twin) and t not in names})
    rows = []
    for name in sorted(names):
        spec = get_spec(name)
        paper = spec.paper
        size = input_size or (paper.input_size if paper else spec.default_input)
        p = profile(create_model(name), size)
        use_paper = paper is not None and size == paper.input_size
        rows.append(
            ModelRow(
                name, spec.family, spec.twin, size, p.params, p.conv_params, p.bflops, p.shortcut_adds, p.cio,
                paper.params_m if use_paper else None, paper.bflops if use_paper else None,
                paper.source if use_paper else None,
                paper.params_decimals if paper else 2, paper.bflops_decimals if paper else 2,
                paper.params_kind if paper else "conv",
            )
        )
    return rows


def _fmt(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _delta(r: ModelRow) -> str:
    dp = "-" if r.paper_params_m is None else f"{r.compared_params / 1e6 / r.paper_params_m - 1:+.1%}"
    df = "-" if r.paper_bflops is None else f"{r.bflops / r.paper_bflops - 1:+.1%}"
    return f"{dp} / {df}"


def format_markdown(rows: list[ModelRow]) -> str:
    """A Markdown table of the rows, with CSP/plain ratios for every pair present."""
    by_name = {r.name: r for r in rows}
    out = [
        "| model | input | params (M) | conv params (M) | paper (M) | BFLOPs | paper BFLOPs | Δ params / BFLOPs | CIO (M) | vs twin: params / BFLOPs / CIO |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = "-"
        twin = by_name.get(r.twin) if r.twin else None
        if twin is not None:
            ratio = f"{twin.name}: {r.conv_params / twin.conv_params:.2f} / {r.bflops / twin.bflops:.2f} / {r.cio / twin.cio:.2f}"
        mark = {"conv": " ✓", "conv+shortcut": " ✓ˢ", "": " ✗", None: ""}[r.matches_paper]
        out.append(
            f"| {r.name}{mark} | {r.input_size} | {r.params / 1e6:.2f} | {r.conv_params / 1e6:.{r.params_decimals}f} | "
            f"{_fmt(r.paper_params_m, r.params_decimals)} | {r.bflops:.{r.bflops_decimals}f} | "
            f"{_fmt(r.paper_bflops, r.bflops_decimals)} | {_delta(r)} | {r.cio / 1e6:.2f} | {ratio} |"
        )
    out.append("")
    out.append("✓ / ✗: conv params and BFLOPs equal / differ from the paper's at its printed precision; "
               "✓ˢ: equal once residual adds are counted as FLOPs, as the Darknet build behind that figure did; "
               "models without an official cfg were designed here (docs/models_design.md) and show their gap in Δ. "
               "Paper params marked as counting every parameter (ELASTIC's convention) are compared with 'params'. "
               "Conv params = conv and linear weights (no BN, no bias); BFLOPs = 2 x conv multiply-adds; "
               "CIO = conv inputs + outputs, elements per image.")
    return "\n".join(out)
