"""dmscale: scale neural networks to a budget in both directions (DMS search/export and μpscaling)."""

__version__ = "0.1.0"
