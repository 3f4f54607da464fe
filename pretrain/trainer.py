"""The training loop: schedule -> data -> engine step -> metrics -> checkpoints, resumable bit-exactly.

Everything that changes over training is a function of ``(step, consumed_samples)`` (LR, batch size, data
position) or lives in the checkpoint (weights, optimizer, RNG), so ``--resume auto`` continues exactly where an
uninterrupted run would be.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.data.loader import build_dataloader, collate
from pretrain.data.sampler import DataParallelSampler
from pretrain.launch.preemption import PREEMPTED_EXIT_CODE, Watchdog
from pretrain import checkpoint as ckpt
from pretrain.async_save import CheckpointWriter
from pretrain.eval_on_save import SideEvals
from pretrain.exits import PlannedExit
from pretrain.spikes import SpikeGuard
from pretrain.stragglers import SectionTimer
from pretrain import reshard
from pretrain import run_lock
from pretrain.config import Config, ConfigError
from pretrain.engine import Engine
from pretrain.engines import build_engine
from pretrain.metrics import MetricsLogger, peak_flops
from pretrain.moe_balance import ExpertBalance
from pretrain.parallel.mesh import SlowBarrier
from pretrain.models.registry import family_spec
from pretrain.prefetch import StepBatches
from pretrain.schedule import Schedule

log = logging.getLogger("pretrain.train")

EXIT_OK = 0
EXIT_PREEMPTED = PREEMPTED_EXIT_CODE  # 75: stopped on request with a checkpoint; run again with --resume auto
EXIT_NONFINITE = 3  # too many non-finite steps in a row (a checkpoint of the last good state is saved)
EXIT_STOPPED_UNSAVED = 128 + signal.SIGTERM  # stopped on request without checkpoint.dir: nothing to resume (143;
# 128 + the signal's number when a signal asked)


class StopFlag:
    """Set by the launcher's preemption handler (``pretrain.launch.preemption``) or any caller; the loop then finishes
    the current step, saves a checkpoint and returns :data:`EXIT_PREEMPTED`."""

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""
        self.stepping = False  # a step finished: a stop can wait for the current step's end (before: exit at once)

    def request(self, reason: str = "requested") -> None:
        self.requested, self.reason = True, reason


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class Trainer:
    """Runs ``cfg.train.steps`` optimizer steps of ``engine`` on ``train_data`` (indexable dataset)."""

    def __init__(self, cfg: Config, train_data, valid_data=None, engine: Engine | None = None,
                 stop: StopFlag | None = None):
        self.cfg = cfg
        self.engine = engine or build_engine(cfg)
        if cfg.train.compile:
            self.engine.model.compile()  # in place: state-dict keys stay those of the eager model
        self.balance = ExpertBalance(self.engine)  # MoE: selection-bias updates and expert telemetry per step
        self.schedule = Schedule(cfg)
        self.stop = stop or StopFlag()
        self.rank = _rank()
        self.exits = PlannedExit(cfg.train.exit_at_step, cfg.train.exit_after_minutes, self.rank)
        self.spikes = SpikeGuard(cfg.train, cfg.checkpoint.dir)  # train.spike_*: skip, rollback or stop
        self.slow_barrier = SlowBarrier()  # checkpoint saves wait on their own long-timeout group (collective)
        self.writer = CheckpointWriter(cfg.checkpoint.async_save)  # checkpoint.async_save: interval saves in a thread
        self.side_evals = SideEvals(cfg, self.rank)  # checkpoint.eval_on_save: each checkpoint scored by a side job
        self.world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.sections = SectionTimer(cfg.train.straggler_interval, cfg.train.straggler_factor, self.rank,
                                     self.world_size)  # straggler attribution (pretrain/stragglers.py)
        self.sections.attach(self.engine.model)
        self._lock_checkpoint_dir()
        self.train_data, self.valid_data = train_data, valid_data
        self.step, self.consumed_samples = 0, 0
        self.data_state = None  # raw-text streams: the saved lane positions (pretrain.data.stream_loader)
        self.watchdog: Watchdog | None = None  # running during fit()
        self._eval_model = None  # the live model wrapped for evals, built at the first task evaluation
        self.metrics = MetricsLogger(cfg.log_dir if self.rank == 0 else None, cfg.logging.tensorboard)
        self.peak = (cfg.logging.peak_tflops * 1e12 if cfg.logging.peak_tflops
                     else peak_flops(self.engine.device))

    # --- checkpoints -------------------------------------------------------------------------------------
    def _lock_checkpoint_dir(self) -> None:
        """Rank 0 locks ``checkpoint.dir`` (one writer per directory, :mod:`pretrain.run_lock`); if another job
        holds it, every rank refuses, before anything in the directory is read or written."""
        if not self.cfg.checkpoint.dir:
            return
        error = None
        if self.rank == 0:
            try:
                run_lock.acquire(self.cfg.checkpoint.dir)
            except ConfigError as e:
                error = e
        if self._agree(error is not None):
            raise error or ConfigError(f"checkpoint.dir={self.cfg.checkpoint.dir} cannot be locked for this job "
                                       f"(rank 0 says why)")

    def save(self, background: bool = False) -> Path | None:
        if not self.cfg.checkpoint.dir:
            return None
        state = self.engine.state_dict()
        # "portable" moments and the "sharding" index let any other layout load this checkpoint (collectives)
        extra = {"optimizer": state["optimizer"], "rng": ckpt.rng_state(),
                 "portable": reshard.optimizer_moments(self.engine)}
        meta = {"consumed_samples": self.consumed_samples, "config": self.cfg.to_dict(),
                "scheduler": {"step": self.step, "consumed_samples": self.consumed_samples},
                "sharding": reshard.sharding_meta(self.engine), "data_skip": self.spikes.data_skip}
        if hasattr(self.train_data, "state_dict"):  # raw-text streams: every rank's lane positions (collective)
            meta["data"] = self.train_data.state_dict(self.consumed_samples + self.spikes.data_skip)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return self.writer.write(self.cfg.checkpoint.dir, self.step, state["model"], extra, meta, background,
                                 rank=self.rank, world_size=world, keep_last=self.cfg.checkpoint.keep_last,
                                 barrier=self.slow_barrier)

    def resume(self, which: str | None, overwrite: bool = False) -> bool:
        """Restore from ``which`` ("auto" = ``checkpoint.dir/latest`` if any, or a path). True if restored.

        Without a checkpoint to resume, ``checkpoint.init_from`` (if set) provides the starting weights; a run
        that already saved its own checkpoints resumes those, so a requeued job continues where it stopped.
        Starting from step 0 over a ``checkpoint.dir`` that holds checkpoints needs ``overwrite`` (the old ones are
        then pruned as the new run saves). Metrics rows past the starting step (replayed, or of a run started
        over) are dropped."""
        where = self.cfg.checkpoint.dir
        if not which and not overwrite and where and ckpt.holds_checkpoints(where):
            raise ConfigError(f"checkpoint.dir={where} already holds checkpoints: continue them with --resume auto, "
                              f"or start over from step 0 with --overwrite")
        restored = self._restore(which)
        if not restored and self.cfg.checkpoint.init_from:
            self.init_weights(self.cfg.checkpoint.init_from)
        dropped = self.metrics.resume_at(self.step)
        if dropped:
            log.info("metrics.jsonl: dropped %d rows after step %d (superseded by this run)", dropped, self.step)
        return restored

    def _restore(self, which: str | None) -> bool:
        if not which or (which == "auto" and not self.cfg.checkpoint.dir):
            return False
        path = ckpt.resolve(self.cfg.checkpoint.dir, which)
        if path is None:
            log.info("no checkpoint in %s yet: starting from scratch", self.cfg.checkpoint.dir)
            return False
        _, saved_meta = reshard.read_meta(path)
        self.data_state = saved_meta.get("data")
        self.spikes.resume(saved_meta)  # data skipped by rollbacks before this checkpoint
        if not reshard.same_layout(saved_meta, self.engine):
            # another layout saved it: assemble full tensors, cut this rank's pieces. Per-rank RNG streams do
            # not map across layouts, so only dropout / router jitter draws differ from the never-stopped run.
            full = reshard.consolidate(path)
            reshard.load_into(self.engine, full)
            self.step, self.consumed_samples = full.step, full.consumed_samples
            log.info("resumed from %s at step %d, resharded from layout %s", path, self.step,
                     saved_meta["sharding"]["layout"])
            return True
        model_state, extra, meta = ckpt.load_checkpoint(path, self.rank)
        if "optimizer" not in extra:
            raise ckpt.CheckpointError(f"{path} holds weights only (e.g. from `pretrain import`): start from it "
                                       f"with checkpoint.init_from={path} instead of resuming it")
        self.engine.load_state_dict({"model": model_state, "optimizer": extra["optimizer"]})
        ckpt.set_rng_state(extra["rng"])
        self.step, self.consumed_samples = meta["step"], meta["consumed_samples"]
        log.info("resumed from %s at step %d (%d samples consumed)", path, self.step, self.consumed_samples)
        return True

    def init_weights(self, which: str) -> None:
        """Load only the model weights of checkpoint ``which`` (continued pretraining, e.g. of an imported HF
        model); optimizer, schedule and data position start fresh."""
        full = reshard.consolidate(which, optimizer=False)
        theirs, ours = full.meta.get("config", {}).get("model", {}), self.cfg.to_dict()["model"]
        differ = sorted(k for k in ours if k in theirs and theirs[k] != ours[k])
        if differ:
            log.warning("checkpoint.init_from %s: model config differs in %s", which, ", ".join(differ))
        try:
            reshard.load_into(self.engine, full, optimizer=False)
        except (RuntimeError, KeyError) as e:
            raise ckpt.CheckpointError(f"checkpoint.init_from {which} does not fit model {self.cfg.family}: {e}") \
                from None
        log.info("initialised the model from %s (step %d); optimizer, schedule and data start fresh",
                 which, full.step)

    # --- loop --------------------------------------------------------------------------------------------
    def evaluate(self) -> float:
        """Mean validation loss per token over ``train.eval_steps`` global batches from the start of the set."""
        t = self.cfg.train
        sampler = DataParallelSampler(len(self.valid_data), self.engine.dp_rank, self.engine.dp_size,
                                      t.micro_batch_size, t.global_batch_size)
        lm_sum = tokens = 0.0
        for _ in range(t.eval_steps):
            batch = sampler.next_global_batch()
            out = self.engine.eval_step([collate([self.valid_data[i] for i in mb]) for mb in batch])
            lm_sum, tokens = lm_sum + out.lm_loss_sum, tokens + out.num_tokens
        return lm_sum / max(tokens, 1.0)

    def evaluate_tasks(self) -> dict[str, float]:
        """Scores of the live model on ``train.eval_tasks``: ``{"eval/<task>/<k>shot/<metric>": value}``."""
        from pretrain.evals.harness import evaluate_tasks, scalar_metrics
        from pretrain.evals.pretrain_model import PretrainModel

        t = self.cfg.train
        if self._eval_model is None:
            from pretrain.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(self.cfg.data.tokenizer)
            stages = self.engine.stages
            if stages:  # pipeline parallel: this rank's stage, hidden states passed rank to rank
                from pretrain.evals.parallel_model import PipelineModel

                self._eval_model = PipelineModel(stages[0].model, stages[0], self.engine.mesh, tokenizer)
            else:
                self._eval_model = PretrainModel(self.engine.model, tokenizer)
        devices = [self.engine.device] if self.engine.device.type == "cuda" else []
        start = time.perf_counter()
        with torch.random.fork_rng(devices=devices):  # leave the training RNG stream untouched (exact resume)
            results = evaluate_tasks(self._eval_model, list(t.eval_tasks), t.eval_tasks_fewshot,
                                     t.eval_tasks_limit, progress=False, group=self.engine.dp_group)
        scores = scalar_metrics(results)
        log.info("step %d: tasks (%.1f s) %s", self.step, time.perf_counter() - start,
                 " | ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in scores.items()))
        return scores

    def fit(self) -> int:
        """Train to ``train.steps``; returns an exit code (EXIT_OK, EXIT_PREEMPTED, EXIT_NONFINITE)."""
        timeout = float(os.environ.get("PRETRAIN_WATCHDOG_TIMEOUT", self.cfg.train.watchdog_timeout))
        self.watchdog = Watchdog(timeout, dump_dir=self.cfg.log_dir).start() if timeout > 0 else None
        self.batches = self._step_batches()  # replaced by a rollback (pretrain/spikes.py)
        try:
            return self._fit(self.batches)
        finally:
            self.batches.close()
            self.writer.close(raising=False)  # after an error: let the write in flight finish before unlocking
            self.sections.close()
            if self.watchdog is not None:
                self.watchdog.stop()
            self.metrics.close()
            if self.rank == 0 and self.cfg.checkpoint.dir:
                run_lock.release(self.cfg.checkpoint.dir)

    def _beat(self, phase: str) -> None:
        if self.watchdog is not None:
            self.watchdog.beat(self.step, phase)

    def _step_batches(self) -> StepBatches:
        """This rank's micro-batches for each remaining step, from the restored data position."""
        t = self.cfg.train
        skip = self.spikes.data_skip  # the data position runs ahead of consumed_samples after a rollback
        sampler = DataParallelSampler(len(self.train_data), self.engine.dp_rank, self.engine.dp_size,
                                      t.micro_batch_size, self.spikes.shifted(self.schedule.batch_size),
                                      self.consumed_samples + skip)

        def counts():
            consumed = self.consumed_samples
            for _ in range(self.step, t.steps):
                yield sampler.num_micro_batches(consumed + skip)
                consumed += self.schedule.batch_size(consumed)

        with torch.random.fork_rng(devices=[]):  # the DataLoader draws a seed: keep the restored RNG stream
            if hasattr(self.train_data, "micro_batches"):  # raw text, tokenized while training
                loader = self.train_data.micro_batches(self.engine.dp_rank, self.engine.dp_size, t.micro_batch_size,
                                                       self.spikes.shifted(self.schedule.batch_size),
                                                       self.consumed_samples + skip, self.data_state,
                                                       self.cfg.data.num_workers)
            else:
                loader = iter(build_dataloader(self.train_data, sampler, self.cfg.data.num_workers))
        return StepBatches(loader, counts(), prefetch=t.prefetch)

    def _fit(self, data: StepBatches) -> int:
        t, c = self.cfg.train, self.cfg.checkpoint
        total, start = t.steps, self.step
        bad_in_row, window = 0, _Window()
        code = EXIT_OK
        if not c.dir:
            log.warning("checkpoint.dir is not set: no checkpoints will be written, and a stop signal ends the run "
                        "without saving")
        while self.step < total:
            gbs = self.schedule.batch_size(self.consumed_samples)
            lr = self.schedule.lr(self.step, self.consumed_samples)
            t0 = time.perf_counter()
            self._beat("train step")
            self.sections.mark("data")
            batches = data.next()
            self.sections.mark("step")
            # the stop request travels with the step's numbers: every rank learns it without another sync
            out = self.engine.train_step(batches, lr, stop=self.stop.requested)
            self.balance.after_step(out.skipped)
            self.stop.stepping = True
            self.writer.poll()  # a failed background checkpoint write is raised here, a step later
            self.side_evals.poll(self.metrics)  # results of a finished side evaluation, tagged with its step
            self.sections.mark("other")
            self.step += 1
            self.consumed_samples += gbs
            step_flops = family_spec(self.cfg.family).batch_flops
            flops = sum(step_flops(self.cfg.model, mb) for mb in batches) * self.engine.dp_size
            window.add(time.perf_counter() - t0, out.num_tokens, flops)
            self.sections.report(self.step, self.metrics)  # every straggler_interval steps (collective)
            action = self.spikes.check(self.step, out)  # non-finite, loss z-score, grad-norm spike
            if action == "rollback" and self.spikes.rollback(self):
                data = self.batches
                continue
            if action in ("stop", "rollback"):  # the diagnostic is logged; the last checkpoint is the last good state
                return EXIT_NONFINITE
            if out.skipped:
                bad_in_row += 1
                log.warning("step %d: non-finite loss %.4g or grad norm %.4g: update skipped (%d in a row)",
                            self.step, out.loss, out.grad_norm, bad_in_row)
                if bad_in_row >= t.max_nonfinite:
                    log.error("stopping: %d non-finite steps in a row", bad_in_row)
                    code = EXIT_NONFINITE
            else:
                bad_in_row = 0
            if self.step % self.cfg.logging.interval == 0 or self.step == total or out.skipped:
                record = {"step": self.step, "loss": out.loss, "lm_loss": out.lm_loss, "lr": lr,
                          "grad_norm": out.grad_norm, "batch_size": gbs, "consumed_samples": self.consumed_samples,
                          "skipped": out.skipped, **getattr(self.train_data, "metrics", dict)(),  # raw text: bad input
                          **self.spikes.metrics(), **self.balance.metrics()}
                self._log(record, window, total)
                window = _Window()
            if t.eval_interval and self.valid_data is not None and (
                    self.step % t.eval_interval == 0 or self.step == total):
                self._beat("validation")
                val = self.evaluate()
                self.metrics.write({"step": self.step, "val_loss": val})
                log.info("step %d: validation loss %.4f (ppl %.2f)", self.step, val, math.exp(min(val, 50)))
            if t.eval_tasks and (self.step % t.eval_interval == 0 or self.step == total):
                self._beat("task evaluation")
                self.metrics.write({"step": self.step, **self.evaluate_tasks()})
            # several ranks stop together: at the step after the request, agreed inside it (no extra sync);
            # a single process stops right after the step the request arrived in
            planned = self.exits.due(self.step, self.stop)  # train.exit_at_step / train.exit_after_minutes
            stop = planned or out.stop or (self.stop.requested and self.world_size == 1)
            if code != EXIT_OK or stop:
                if stop and not c.dir:
                    log.warning("stop requested (%s) at step %d: no checkpoint.dir, nothing saved",
                                self.stop.reason or "flag", self.step)
                    code = _unsaved_exit_code(self.stop.reason)
                elif stop:
                    log.warning("stop requested (%s): checkpoint at step %d", self.stop.reason or "flag", self.step)
                    code = EXIT_PREEMPTED
                self._save()
                break
            if c.interval and self.step % c.interval == 0 and self.step < total:
                self._save(background=True)
        else:
            if c.save_final and self.step > start:
                self._save()
        self.writer.wait()  # an interval save still being written in the background
        self._beat("waiting for the eval-on-save side job")
        self.side_evals.poll(self.metrics, wait=True)
        return code

    def _save(self, background: bool = False) -> None:
        self._beat("checkpoint save")
        self.side_evals.after_save(self.save(background), self.metrics)

    def _agree(self, flag: bool) -> bool:
        """True on every rank if any rank's ``flag`` is (one collective and host read: not for every step; the
        per-step stop request travels inside the engine's step). The flag travels on the engine's device: NCCL
        has no CPU tensors."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.engine.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _log(self, record: dict, window: "_Window", total: int) -> None:
        tokens_per_s = window.tokens / max(window.seconds, 1e-9)
        world = self.engine.dp_size * self.engine.model_parallel_size
        flops = window.flops / max(window.seconds, 1e-9) / world  # achieved FLOP/s per device
        record.update(tokens_per_s=tokens_per_s, tflops=flops / 1e12, mfu=flops / self.peak if self.peak else 0.0,
                      memory_gb=_memory_gb(self.engine),
                      step_time_s=window.seconds / max(window.steps, 1))
        self.metrics.write(record)
        eta = (total - record["step"]) * record["step_time_s"]
        log.info("step %d/%d | loss %.4f | lr %.3e | grad %.3f | %.0f tok/s | %.3g TFLOP/s | MFU %.1f%% | "
                 "mem %.2f GB | ETA %s%s", record["step"], total, record["loss"], record["lr"], record["grad_norm"],
                 tokens_per_s, record["tflops"], 100 * record["mfu"], record["memory_gb"], _hms(eta),
                 " | SKIPPED" if record["skipped"] else "")


class _Window:
    """Time, tokens and FLOPs since the last log line."""

    def __init__(self) -> None:
        self.seconds, self.tokens, self.flops, self.steps = 0.0, 0.0, 0.0, 0

    def add(self, seconds: float, tokens: float, flops: float) -> None:
        self.seconds, self.tokens, self.flops = self.seconds + seconds, self.tokens + tokens, self.flops + flops
        self.steps += 1


def _unsaved_exit_code(reason: str) -> int:
    """128 + the stop signal's number, like a process the signal ended (not 75: there is nothing to resume)."""
    return 128 + signal.Signals[reason] if reason in signal.Signals.__members__ else EXIT_STOPPED_UNSAVED


def _memory_gb(engine: Engine) -> float:
    if engine.device.type == "cuda":
        return torch.cuda.max_memory_allocated(engine.device) / 2**30
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**30


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
