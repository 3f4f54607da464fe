"""Evaluation of each saved checkpoint in a side process (``checkpoint.eval_on_save``), never blocking training.

After each save, rank 0 starts ``python -m pretrain.eval_on_save STEP_DIR RESULT.json TASKS LIMIT FEWSHOT``
(locally, a plain subprocess; on Slurm it runs inside the job's allocation, on rank 0's node: an ``sbatch`` job of
its own is not done). The side process waits until the checkpoint is published (``meta.json`` in place: a
background save may still be writing it), exports it to a Hugging Face directory (:func:`pretrain.hf.export.export`,
into a temporary directory), checks our logits against ``transformers`` on a fixed batch (decoder-only families:
64 random token ids, seed 0; the largest absolute difference is reported), scores the tasks
(``checkpoint.eval_on_save_tasks``, limited to ``train.eval_tasks_limit`` items, ``train.eval_tasks_fewshot``
shots) and writes ``RESULT.json`` atomically. The trainer polls every step and, once a result is there, writes it
into the run's metrics (``metrics.jsonl`` and TensorBoard) tagged with the checkpoint's step:
``eval_on_save/logit_max_abs_diff``, ``eval_on_save/seconds`` and ``eval/<task>/<k>shot/<metric>``.

One side job at a time: a save while the previous job runs is not evaluated (logged). The job reads the
checkpoint while training goes on, so ``checkpoint.keep_last`` must keep it until the job has exported it
(``keep_last >= 2``, as validated). The last job is waited for when training ends.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pretrain import checkpoint as ckpt

log = logging.getLogger("pretrain.train")

RESULTS = "eval_on_save"  # folder of the result files, under the run's log directory


class SideEvals:
    """Starts the side job after a save (rank 0) and writes finished results into the metrics."""

    def __init__(self, cfg, rank: int) -> None:
        self.enabled = bool(cfg.checkpoint.eval_on_save and cfg.checkpoint.dir and rank == 0)
        self.tasks = ",".join(cfg.checkpoint.eval_on_save_tasks)
        self.limit, self.fewshot = cfg.train.eval_tasks_limit or 0, cfg.train.eval_tasks_fewshot
        self.folder = Path(cfg.log_dir or cfg.checkpoint.dir or ".") / RESULTS
        self.job: tuple[subprocess.Popen, Path] | None = None

    def after_save(self, path: Path | None) -> None:
        if not self.enabled or path is None:
            return
        if self.job is not None and self.job[0].poll() is None:
            log.warning("eval on save: the job for the previous checkpoint still runs; %s is not evaluated", path.name)
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        result = self.folder / f"{path.name}.json"
        out = open(self.folder / f"{path.name}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "pretrain.eval_on_save", str(path), str(result), self.tasks,
                                 str(self.limit), str(self.fewshot)], stdout=out, stderr=subprocess.STDOUT)
        out.close()
        self.job = (proc, result)
        log.info("eval on save: side job %d evaluates %s", proc.pid, path.name)

    def poll(self, metrics, wait: bool = False) -> None:
        """Write a finished job's results into ``metrics`` (``wait``: wait for the running job first)."""
        if self.job is None or (not wait and self.job[0].poll() is None):
            return
        proc, result = self.job
        code = proc.wait()
        self.job = None
        if code != 0 or not result.is_file():
            log.error("eval on save: the side job failed (exit %d); see %s", code, result.with_suffix(".log"))
            return
        row = json.loads(result.read_text())
        metrics.write(row)
        log.info("eval on save: step %d: %s", row["step"],
                 " | ".join(f"{k.split('/', 1)[1]} {v:.4g}" for k, v in row.items() if k != "step"))


def _wait_published(step_dir: Path, timeout_s: float = 3600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ckpt._is_complete(step_dir):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{step_dir} was not published within {timeout_s:.0f} s")
        time.sleep(0.5)


def logit_difference(step_dir: Path, hf_dir: Path) -> float | None:
    """Largest |our logit - transformers' logit| on 64 random ids (seed 0); None for encoder-decoders."""
    from transformers import AutoModelForCausalLM

    from pretrain.evals.pretrain_model import load_checkpoint_model

    ours = load_checkpoint_model(step_dir)
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
    with tempfile.TemporaryDirectory(prefix="eval_on_save_") as tmp:
        hf_dir = export(step_dir, Path(tmp) / "hf")
        diff = logit_difference(step_dir, hf_dir)
    if diff is not None:
        row["eval_on_save/logit_max_abs_diff"] = diff
    if tasks:
        model = load_checkpoint_model(step_dir)
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
