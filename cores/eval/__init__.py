"""Evaluation stage: perplexity of a float, fake-quantized or deployed model over the streaming runtime."""
