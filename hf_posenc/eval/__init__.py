"""Evaluation over (model, tokenizer, texts): perplexity now; passkey and needle follow."""

from .perplexity import perplexity, token_nll

__all__ = ["perplexity", "token_nll"]
