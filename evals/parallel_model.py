"""Evaluation with the model split over ranks: tensor parallel (megatron-core layers, ``pretrain.parallel.tensor``),
pipeline parallel (GPT stages pass hidden states rank to rank), data parallel over the remaining ranks.

For checkpoints too large for one device, or to evaluate in a training layout::

    torchrun --nproc-per-node 8 -m pretrain.cli eval --checkpoint runs/x --tp 2 --pp 2 --tasks kjv_cont ...

Each rank builds only its part of the model and takes its pieces of a checkpoint saved under any layout
(``pretrain.reshard``). The ranks of one model replica score the same requests; the replicas (the
data-parallel group) split them, as in :class:`pretrain.evals.engine.Scorer`. A pipeline runs one batch at a time
through its stages (evaluation batches are small, and the scorer needs a batch's logits before it builds the
next one); the last stage broadcasts the scored positions' logits, so every rank returns the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from pretrain.evals.pretrain_model import PretrainModel, checkpoint_tokenizer


class PipelineModel(PretrainModel):
    """One pipeline stage (:class:`pretrain.parallel.stage.Stage`) of a GPT behind :class:`EvalModel`."""

    supports_packing = False  # stages take no attention mask

    def __init__(self, model: torch.nn.Module, stage: torch.nn.Module, mesh, tokenizer,
                 max_length: int | None = None, bos_id: int | None = None, eos_id: int | None = None):
        super().__init__(model, tokenizer, max_length, bos_id, eos_id)
        self.stage, self.mesh = stage, mesh
        lay = mesh.layout
        self._prev = lay.rank_of(mesh.pp_rank - 1, mesh.dp_rank, mesh.tp_rank) if not stage.first else None
        self._next = lay.rank_of(mesh.pp_rank + 1, mesh.dp_rank, mesh.tp_rank) if not stage.last else None
        self._last = lay.rank_of(lay.pp - 1, mesh.dp_rank, mesh.tp_rank)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
        with self._scoring():
            x = self._pad(input_ids, self.prefix_token_id)
            if not self.stage.first:  # the previous stage sends its sequence shard under sequence parallelism
                x = torch.empty(x.shape[0], x.shape[1] // self.seq_multiple, self.model.cfg.hidden_size,
                                device=self.device)
                dist.recv(x, self._prev)
            out = self.stage(x)
            self.stage.aux_losses.clear()
            if self._next is not None:
                dist.send(out.contiguous(), self._next)
            sizes = [z - a for a, z in spans]
            rows = torch.empty(sum(sizes), self.model.cfg.vocab_size, device=self.device)
            if self.stage.last:
                full = self.model.factory.gather_logits(out)
                rows = torch.cat([full[b, a:z] for b, (a, z) in enumerate(spans)]).float()
            dist.broadcast(rows, self._last, group=self.mesh.group("pp"))
            return list(rows.split(sizes))

    def _steps(self, ids: list[int], max_new_tokens: int) -> Iterator[int]:
        """Recomputes the whole sequence per token (no KV cache across stages); every stage runs the same loop
        on the broadcast logits, so all agree on each token and on when to stop."""
        return self._recomputed_steps(ids)


def load_sharded_model(path: str | Path, tp: int = 1, pp: int = 1, tokenizer: str | Path | None = None,
                       device: str = "cpu", max_length: int | None = None) -> tuple[PretrainModel, object]:
    """This rank's part of checkpoint ``path`` in a ``tp`` x ``pp`` layout (data parallel over the rest of the
    world) and the data-parallel process group to split requests over. Every rank calls it."""
    from pretrain.parallel.engine import layer_factory
    from pretrain.parallel.mesh import Layout, Mesh
    from pretrain import reshard
    from pretrain.hf.export import model_config
    from pretrain.models import build_model, family_spec

    step_dir, _ = reshard.read_meta(path)
    state = reshard.consolidate(step_dir, optimizer=False)
    family, cfg = model_config(state.meta, step_dir)
    if pp > 1 and not family_spec(family).pipeline_eval:
        raise ValueError(f"{step_dir}: pipeline-parallel evaluation supports GPT models; evaluate this "
                         f"{family} model with --tp only")
    mesh = Mesh(Layout.from_world(dist.get_world_size(), tp=tp, pp=pp))
    torch.manual_seed(0)  # every tensor rank draws the same full init before taking its shard (then overwritten)
    model = build_model(family, cfg, layer_factory(mesh, sequence_parallel=False)).to(device)
    tok, bos, eos = checkpoint_tokenizer(state.meta, step_dir, tokenizer)
    if pp == 1:
        reshard.load_into(SimpleNamespace(model=model, mesh=mesh, ds=None), state, optimizer=False)
        return PretrainModel(model.eval(), tok, max_length, bos, eos), mesh.group("dp")
    from pretrain.parallel.pipeline import StageList
    from pretrain.parallel.stage import split_model

    stage = split_model(model, [mesh.pp_rank], pp)[0]
    reshard.load_into(SimpleNamespace(model=StageList([stage]), mesh=mesh, ds=None), state, optimizer=False)
    return PipelineModel(stage.model.eval(), stage.eval(), mesh, tok, max_length, bos, eos), mesh.group("dp")
