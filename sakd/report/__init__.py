"""The run report (report.json / report.md), its plots and the model card."""
