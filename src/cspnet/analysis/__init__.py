"""Checks of the paper's claims on your own data: gradient duplication, computational bottleneck, γ/fusion ablation."""
from .ablation import AblationRun, ablation_runs, format_ablation_table, plot_ablation, run_ablation
from .gradients import GradientReport, StageGradients, analyze_gradients, cosine, stage_gradients
from .layers import LayerCost, LayerProfileSummary, analyze_layers, layer_costs

__all__ = [
    "AblationRun", "GradientReport", "LayerCost", "LayerProfileSummary", "StageGradients", "ablation_runs",
    "analyze_gradients", "analyze_layers", "cosine", "format_ablation_table", "layer_costs", "plot_ablation",
    "run_ablation", "stage_gradients",
]
