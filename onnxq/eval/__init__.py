"""Accuracy of a quantized model against its float original: perplexity, KL, top-1, embedding cosine."""
from onnxq.eval.metrics import compare_embeddings, compare_lm, compare_lms, make_session, perplexity

__all__ = ["compare_embeddings", "compare_lm", "compare_lms", "make_session", "perplexity"]
