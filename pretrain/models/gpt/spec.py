"""The GPT family's spec: what the rest of the stack needs to know about it (see :mod:`pretrain.models.spec`)."""

from pretrain.models.flops import gpt_batch_flops, gpt_param_count
from pretrain.models.gpt import parallelize
from pretrain.models.gpt.config import GPTConfig
from pretrain.models.gpt.hf import HF
from pretrain.models.gpt.model import GPT
from pretrain.models.spec import ModelSpec

SPEC = ModelSpec(
    name="gpt", config=GPTConfig, model=GPT, dataset="gpt", tp_sizes=parallelize.tp_sizes,
    pipeline_blocks=parallelize.pipeline_blocks, parallelize=parallelize.parallelize,
    pipeline_stage=parallelize.pipeline_stage, stage_inputs=parallelize.stage_inputs, batch_flops=gpt_batch_flops,
    param_count=gpt_param_count,
    eval_kind="causal", pipeline_eval=True, hf=HF,
)
