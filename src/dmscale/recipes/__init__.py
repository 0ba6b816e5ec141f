"""Recipes: the one training loop and the procedures built on it.

``loop`` (``train_loop``, checkpoint state, non-finite stops), ``tasks`` (image classification,
causal LM, a user's loss), ``pipelines`` (``Search``, ``finish``, ``dms`` / ``dms_p`` / ``dms_fast``,
``finetune``), ``oneshot`` (one-shot pruning and the common-ratio search), ``baselines`` (their
image forms) and ``llm`` (their causal-LM forms). See docs/architecture.md.
"""
