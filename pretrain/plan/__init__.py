"""The layout planner: per-GPU memory by component and step time of a config's parallel layouts, before launch.

:mod:`~pretrain.plan.hardware` (devices), :mod:`~pretrain.plan.shapes` (parameters and activations from the
config), :mod:`~pretrain.plan.memory`, :mod:`~pretrain.plan.timing`, :mod:`~pretrain.plan.search` (valid
layouts, ranked) and :mod:`~pretrain.plan.cli` (``pretrain plan``). docs/planning.md gives every formula.
"""
