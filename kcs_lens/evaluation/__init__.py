"""Scoring triplets and text, evaluating a run (original vs remaining), random baselines, seeds'
overlap, the paper-style table over runs and exporting an HF checkpoint."""
