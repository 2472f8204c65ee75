"""Verification: did the model forget, or only hide? (DESIGN.md §5)

A model is *measured* once (``measure.measure``: multiple-choice scores and truth ratios on the forget entities'
questions, relearning and quantization attacks, membership inference, perturbation probes), and an unlearned
model's measurements are then *compared* with the vanilla model's and, where there is one, the retrained
oracle's (``verdict.compare``), giving each check a value, a threshold and pass or fail.

Modules: ``forget_quality`` (truth ratio, KS forget quality, gaps to the oracle), ``attacks`` (relearning,
round-to-nearest and NF4 quantization, recovery), ``mia`` (LOSS, zlib, Min-K%, Min-K%++ and privleak),
``probes`` (paraphrases, perturbed images, translated prompts), ``measure`` (one model's measurements),
``verdict`` (options, thresholds, checks, ``verification.json`` and ``verification.md``), ``tables`` (the
report's verification section).
"""
