"""pretrain: distributed large-model pretraining (GPT, T5, Switch-MoE)."""

__version__ = "0.1.0"
