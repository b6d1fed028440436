"""Evaluation: the evaluator registry and runner, the evaluators, and ``--mode=evaluate``.

Modules: ``context`` (what one evaluation shares: samples, real data, backbones),
``image`` (FID, KID, IS, PRDC, likelihood), ``groups`` (fairness discrepancy and per-group
quality of generated samples), ``tabular`` (fair classifiers, representations and row
generators), ``audit`` (membership, memorisation), each registering its evaluators in
``registry`` (``EVALUATORS``), ``runner`` (the ``eval`` section's checks, ``Evaluator``, the
JSON report) and ``modes`` (``--mode=evaluate`` and ``--mode=sample``).
"""
