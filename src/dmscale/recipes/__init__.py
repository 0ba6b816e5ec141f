"""Recipes: training loops and the DMS / DMS_p / DMS_fast procedures, one-shot pruning baselines."""
