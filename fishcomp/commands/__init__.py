"""Commands that read artifacts without being stages of the graph: check, validate, heatmap, report."""
