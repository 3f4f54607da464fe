"""Zero/few-shot evaluation: task YAMLs (``tasks.py``), the batched scoring engine (``engine.py``) over a small
model interface (``model.py``, ``pretrain_model.py``), metrics (``metrics.py``), ``evaluate_tasks``
(``harness.py``), ``pretrain eval`` (``cli.py``) and the lm-evaluation-harness plugin (``lm_eval_plugin.py``)."""
