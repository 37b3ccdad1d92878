"""Judging a merged model: skill kept per expert (``skill``), lm-evaluation-harness benchmarks (``benchmarks``),
the questions asked side by side (``questions``). Results are written beside the model and shown on its card
(``publish.eval_report``)."""
