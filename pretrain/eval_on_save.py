"""Evaluation of each saved checkpoint in a side process (``checkpoint.eval_on_save``), never blocking training.

After each save, rank 0 starts ``python -m pretrain.eval_on_save STEP_DIR RESULT.json TASKS LIMIT FEWSHOT``:
locally a plain subprocess; when training runs in a Slurm job (``$SLURM_JOB_ID``;
``checkpoint.eval_on_save_launcher`` auto | subprocess | sbatch) a one-task job of its own, submitted with ``sbatch``
(:func:`pretrain.launch.slurm.submit_side_job`, plus ``checkpoint.eval_on_save_sbatch`` options, e.g. a partition
and a GPU); either logs to ``RESULT.log``. The side process waits until the checkpoint is published (``meta.json``
in place: a background save may still be writing it), exports it to a Hugging Face directory
(:func:`pretrain.hf.export.export`, into a temporary directory), checks our logits against ``transformers`` on a
fixed batch (decoder-only families: 64 random token ids, seed 0; the largest absolute difference is reported),
scores the tasks
(``checkpoint.eval_on_save_tasks``, limited to ``train.eval_tasks_limit`` items, ``train.eval_tasks_fewshot``
shots) and writes ``RESULT.json`` atomically. The trainer polls every step and, once a result is there, writes it
into the run's metrics (``metrics.jsonl`` and TensorBoard) tagged with the checkpoint's step:
``eval_on_save/logit_max_abs_diff``, ``eval_on_save/seconds`` and ``eval/<task>/<k>shot/<metric>``.

One side job at a time: a save while the previous job runs (or is queued) is not evaluated (logged). The job reads
the checkpoint while training goes on, so ``checkpoint.keep_last`` must keep it until the job has exported it
(``keep_last >= 2``, as validated; a job that starts only after its checkpoint was pruned fails, saying so). The
last job is waited for when training ends; a Slurm job that is still queued
:data:`PENDING_GRACE_S` later is left to run on its own (its ``RESULT.json`` is not merged into the metrics: the
training job may hold the very nodes it waits for). During training a Slurm job's state is only asked at a save; a
finished job is noticed by its result file.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain import checkpoint as ckpt

log = logging.getLogger("pretrain.train")

RESULTS = "eval_on_save"  # folder of the result files, under the run's log directory
PENDING_GRACE_S = 120.0  # at the end of training, how long a queued Slurm side job may take to start


@dataclass
class SideJob:
    """One side evaluation: a local subprocess or a Slurm job, and the result file it writes."""

    result: Path
    proc: subprocess.Popen | None = None
    slurm_id: str | None = None

    def state(self, ask_slurm: bool = True) -> str:
        """``done`` (the result file exists or the process ended), ``running`` or, for Slurm, ``pending``
        (``ask_slurm=False``: a Slurm job without its result counts as ``running``, without asking Slurm)."""
        if self.proc is not None:
            return "running" if self.proc.poll() is None else "done"
        if self.result.is_file() or not ask_slurm:
            return "done" if self.result.is_file() else "running"
        from pretrain.launch.slurm import FINAL_STATES, LaunchError, job_info

        try:
            state = job_info(self.slurm_id).get("JobState", "COMPLETED")  # forgotten (MinJobAge): long finished
        except LaunchError:  # scontrol failed this time: ask again later
            return "pending"
        return "done" if state in FINAL_STATES else "pending" if state == "PENDING" else "running"

    def wait(self) -> int | None:
        """The exit status (a Slurm job: 0 when it wrote its result); None: left queued after PENDING_GRACE_S."""
        if self.proc is not None:
            return self.proc.wait()
        deadline = time.monotonic() + PENDING_GRACE_S
        while (state := self.state()) != "done":
            if state == "pending" and time.monotonic() > deadline:
                log.warning("eval on save: Slurm job %s has not started %.0f s after training ended; it is left "
                            "to run on its own and will write %s", self.slurm_id, PENDING_GRACE_S, self.result)
                return None
            time.sleep(1.0)
        return 0 if self.result.is_file() else 1


class SideEvals:
    """Starts the side job after a save (rank 0) and writes finished results into the metrics."""

    def __init__(self, cfg, rank: int) -> None:
        self.enabled = bool(cfg.checkpoint.eval_on_save and cfg.checkpoint.dir and rank == 0)
        self.tasks = ",".join(cfg.checkpoint.eval_on_save_tasks)
        self.limit, self.fewshot = cfg.train.eval_tasks_limit or 0, cfg.train.eval_tasks_fewshot
        self.folder = Path(cfg.log_dir or cfg.checkpoint.dir or ".") / RESULTS
        launcher = cfg.checkpoint.eval_on_save_launcher
        self.sbatch = launcher == "sbatch" or (launcher == "auto" and "SLURM_JOB_ID" in os.environ)
        self.sbatch_options = list(cfg.checkpoint.eval_on_save_sbatch)
        self.job: SideJob | None = None

    def after_save(self, path: Path | None, metrics) -> None:
        if not self.enabled or path is None:
            return
        if self.job is not None and self.job.state() != "done":
            log.warning("eval on save: the job for the previous checkpoint still runs; %s is not evaluated", path.name)
            return
        self.poll(metrics, wait=True)  # the previous job has ended: merge its result (or report its failure)
        self.folder.mkdir(parents=True, exist_ok=True)
        result = self.folder / f"{path.name}.json"
        argv = [sys.executable, "-m", "pretrain.eval_on_save", str(path), str(result), self.tasks, str(self.limit),
                str(self.fewshot)]
        if self.sbatch:
            from pretrain.launch.slurm import LaunchError, submit_side_job

            try:
                job_id = submit_side_job(argv, f"eval-{path.name}", result.with_suffix(".log"), self.sbatch_options)
            except LaunchError as e:
                log.error("eval on save: %s; %s is not evaluated", e, path.name)
                return
            self.job = SideJob(result, slurm_id=job_id)
            log.info("eval on save: Slurm job %s evaluates %s", job_id, path.name)
            return
        with open(result.with_suffix(".log"), "w") as out:
            self.job = SideJob(result, proc=subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT))
        log.info("eval on save: side job %d evaluates %s", self.job.proc.pid, path.name)

    def poll(self, metrics, wait: bool = False) -> None:
        """Write a finished job's results into ``metrics`` (``wait``: wait for the running job first)."""
        if self.job is None or (not wait and self.job.state(ask_slurm=False) != "done"):
            return
        job, self.job = self.job, None
        code = job.wait()
        if code is None:  # a Slurm job left queued
            return
        if code != 0 or not job.result.is_file():
            log.error("eval on save: the side job failed (exit %d); see %s", code, job.result.with_suffix(".log"))
            return
        row = json.loads(job.result.read_text())
        metrics.write(row)
        log.info("eval on save: step %d: %s", row["step"],
                 " | ".join(f"{k.split('/', 1)[1]} {v:.4g}" for k, v in row.items() if k != "step"))


def _wait_published(step_dir: Path, timeout_s: float = 3600.0) -> None:
    deadline = time.monotonic() + timeout_s
    pointer = step_dir.parent / ckpt.LATEST
    while not ckpt._is_complete(step_dir):
        latest = pointer.read_text().strip() if pointer.is_file() else ""
        if not step_dir.exists() and latest > step_dir.name:  # published, then pruned: a later save names latest
            raise FileNotFoundError(f"{step_dir} was pruned (training saved {latest} meanwhile) before this job "
                                    "started: raise checkpoint.keep_last")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{step_dir} was not published within {timeout_s:.0f} s")
        time.sleep(0.5)


def logit_difference(ours, hf_dir: Path) -> float | None:
    """Largest |our logit - transformers' logit| on 64 random ids (seed 0), ``ours`` the checkpoint's loaded model
    (:func:`pretrain.evals.pretrain_model.load_checkpoint_model`); None for encoder-decoders."""
    from transformers import AutoModelForCausalLM

    if ours.is_encoder_decoder:
        return None
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    vocab = theirs.config.vocab_size
    ids = torch.randint(0, vocab, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (ours.model.logits(ids) - theirs(input_ids=ids).logits).abs().max().item()


def evaluate(step_dir: Path, tasks: list[str], limit: int, fewshot: int) -> dict:
    """The metrics row of one checkpoint (see the module docstring)."""
    from pretrain.evals.harness import evaluate_tasks, scalar_metrics
    from pretrain.evals.pretrain_model import load_checkpoint_model
    from pretrain.hf.export import export

    start = time.perf_counter()
    _wait_published(step_dir)
    meta = json.loads((step_dir / ckpt.META).read_text())
    row: dict = {"step": meta["step"]}
    model = load_checkpoint_model(step_dir)
    with tempfile.TemporaryDirectory(prefix="eval_on_save_") as tmp:
        diff = logit_difference(model, export(step_dir, Path(tmp) / "hf"))
    if diff is not None:
        row["eval_on_save/logit_max_abs_diff"] = diff
    if tasks:
        row.update(scalar_metrics(evaluate_tasks(model, tasks, fewshot, limit or None, progress=False)))
    row["eval_on_save/seconds"] = time.perf_counter() - start
    return row


def main(argv: list[str]) -> int:
    step_dir, result = Path(argv[0]), Path(argv[1])
    torch.set_num_threads(1)  # a side job: leave the cores to training
    row = evaluate(step_dir, [t for t in argv[2].split(",") if t], int(argv[3]), int(argv[4]))
    ckpt.write_atomic(result, json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
