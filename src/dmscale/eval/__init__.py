"""Evaluation of (pruned) language models: sliding-window perplexity and zero-shot multiple choice."""

from dmscale.eval.multiple_choice import choice_loglikelihoods, eval_mc_main, load_items, multiple_choice
from dmscale.eval.perplexity import eval_ppl_main, load_causal_lm, load_tokenizer, perplexity, sliding_window_nll

__all__ = ["perplexity", "sliding_window_nll", "multiple_choice", "choice_loglikelihoods", "load_items",
           "load_causal_lm", "load_tokenizer", "eval_ppl_main", "eval_mc_main"]
