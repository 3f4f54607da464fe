"""The T5 family's spec: what the rest of the stack needs to know about it (see :mod:`pretrain.models.spec`)."""

from pretrain.models.flops import t5_batch_flops, t5_param_count
from pretrain.models.spec import ModelSpec
from pretrain.models.t5 import parallelize
from pretrain.models.t5.config import T5Config
from pretrain.models.t5.hf import HF
from pretrain.models.t5.model import T5

SPEC = ModelSpec(
    name="t5", config=T5Config, model=T5, dataset="t5", tp_sizes=parallelize.tp_sizes,
    pipeline_blocks=parallelize.pipeline_blocks, parallelize=parallelize.parallelize,
    pipeline_stage=parallelize.pipeline_stage, stage_inputs=parallelize.stage_inputs, batch_flops=t5_batch_flops,
    param_count=t5_param_count,
    sequence_keys=("data.seq_length", "data.decoder_seq_length"), eval_kind="seq2seq", hf=HF,
)
