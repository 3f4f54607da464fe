"""Task definitions: YAML files in (a subset of) lm-evaluation-harness's format, validated up front.

A task names its data (``dataset_path``: ``json``/``csv``/``parquet`` with ``dataset_kwargs.data_files``, a
directory written by ``datasets.save_to_disk``, a Hugging Face dataset name, or ``local_data: NAME`` for the
offline sets built by :mod:`pretrain.evals.local_data`), a split, Jinja2 prompt templates (``doc_to_text``,
``doc_to_target``, ``doc_to_choice``; a bare column name selects that column, as in lm-eval), an
``output_type`` and its ``metric_list``. Everything that can be checked before scoring is checked here, so
bad input fails with the file and key named instead of deep inside the scorer.

Task files may come from anywhere, so they cannot run code: templates render in Jinja2's immutable sandbox (no
attribute starting with ``_``, no mutation: ``{{ q.__class__.__mro__ }}`` is refused), there is no ``!function``
(lm-eval's Python hook), and ``dataset_kwargs.trust_remote_code`` is refused. lm-eval itself trusts its task files
(docs/reliability.md).
"""

from __future__ import annotations

import ast
import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import yaml

TASK_DIR = Path(__file__).parent / "tasks"

METRICS: dict[str, tuple[str, ...]] = {
    "multiple_choice": ("acc", "acc_norm", "acc_bytes"),
    "loglikelihood": ("acc", "perplexity"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity"),
    "generate_until": ("exact_match",),
}
REQUIRED = ("task", "dataset_path", "test_split", "output_type", "doc_to_target")
KNOWN = set(REQUIRED) | {
    "dataset_name", "dataset_kwargs", "local_data", "training_split", "validation_split", "fewshot_split",
    "doc_to_text", "doc_to_choice", "target_delimiter", "fewshot_delimiter", "description", "metric_list",
    "generation_kwargs", "num_fewshot", "fewshot_seed",
    # lm-eval keys accepted and ignored: they do not change the scores computed here
    "metadata", "tag", "should_decontaminate", "doc_to_decontamination_query", "output_path", "repeats",
}
_ENV = jinja2.sandbox.ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


class TaskError(ValueError):
    """A task definition or its data is unusable; the message names the file and key."""


@dataclass
class Task:
    name: str
    source: str                      # the YAML file, for messages
    output_type: str
    metrics: list[dict]
    docs: list[dict]
    fewshot_docs: list[dict]
    fewshot_is_test: bool            # few-shot examples come from the evaluated split: exclude the item
    cfg: dict = field(repr=False)

    # ---- prompts --------------------------------------------------------------------------------------------
    def _field(self, key: str, doc: dict) -> Any:
        spec = self.cfg.get(key)
        if isinstance(spec, list):
            return spec
        if isinstance(spec, int):
            return spec
        if spec in doc:
            return doc[spec]
        try:
            return _ENV.from_string(str(spec)).render(**doc)
        except jinja2.exceptions.SecurityError as e:
            raise TaskError(f"{self.source}: {key} {spec!r}: {e}: task templates run sandboxed") from None
        except jinja2.UndefinedError as e:
            raise TaskError(f"{self.source}: {key} {spec!r}: {e.message}; dataset columns: {sorted(doc)}") from None

    def text(self, doc: dict) -> str:
        return str(self._field("doc_to_text", doc)) if "doc_to_text" in self.cfg else ""

    def choices(self, doc: dict) -> list[str]:
        value = self._field("doc_to_choice", doc)
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise TaskError(f"{self.source}: doc_to_choice did not give a list: {value[:80]!r}") from None
        if not isinstance(value, list) or not value:
            raise TaskError(f"{self.source}: doc_to_choice must give a non-empty list, got {value!r}")
        return [str(c) for c in value]

    def target(self, doc: dict) -> Any:
        """A choice index for multiple choice, the target text otherwise."""
        value = self._field("doc_to_target", doc)
        if self.output_type != "multiple_choice":
            return str(value)
        choices = self.choices(doc)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, str) and value in choices:
            value = choices.index(value)
        if not isinstance(value, int) or not 0 <= value < len(choices):
            raise TaskError(f"{self.source}: doc_to_target gave {value!r}, not an index into {len(choices)} "
                            f"choices or one of them")
        return value

    def target_text(self, doc: dict) -> str:
        t = self.target(doc)
        return self.choices(doc)[t] if self.output_type == "multiple_choice" else t

    def context(self, index: int, k: int, seed: int | None = None) -> str:
        """Description + ``k`` solved examples + the item's prompt. Examples are drawn with a seed fixed per
        item (so results do not depend on request order) and never include the item itself."""
        doc = self.docs[index]
        shots: list[dict] = []
        if k:
            n = len(self.fewshot_docs)
            if n - self.fewshot_is_test < k:
                raise TaskError(f"{self.source}: {k}-shot needs {k} few-shot examples, only "
                                f"{n - self.fewshot_is_test} available")
            rng = random.Random(f"{self.cfg.get('fewshot_seed', 1234) if seed is None else seed}:{index}")
            picked: list[int] = []
            for _ in range(100 * k):  # O(k) draws, not a pass over a possibly huge split per item
                i = rng.randrange(n)
                if i not in picked and not (self.fewshot_is_test and i == index) and self.fewshot_docs[i] != doc:
                    picked.append(i)
                    if len(picked) == k:
                        break
            if len(picked) < k:
                raise TaskError(f"{self.source}: could not draw {k} few-shot examples different from item {index}")
            shots = [self.fewshot_docs[i] for i in picked]
        sep, delim = self.cfg.get("fewshot_delimiter", "\n\n"), self.cfg.get("target_delimiter", " ")
        parts = [self.text(s) + delim + self.target_text(s) for s in shots] + [self.text(doc)]
        return self.cfg.get("description", "") + sep.join(parts)


# ---- loading ------------------------------------------------------------------------------------------------
def task_path(name_or_path: str, include: list[str | Path] = ()) -> Path:
    """A YAML path, or the task of that name in ``include`` dirs then the bundled ``evals/tasks``."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise TaskError(f"task file {p} does not exist")
        return p
    for d in [*map(Path, include), TASK_DIR]:
        for f in sorted(d.glob("*.y*ml")):
            if f.stem == name_or_path or _peek_name(f) == name_or_path:
                return f
    known = sorted(_peek_name(f) for d in [*map(Path, include), TASK_DIR] for f in d.glob("*.y*ml"))
    raise TaskError(f"unknown task {name_or_path!r}; known tasks: {', '.join(known)}")


def _peek_name(f: Path) -> str:
    try:
        return str((yaml.safe_load(f.read_text()) or {}).get("task", f.stem))
    except yaml.YAMLError:
        return f.stem


def load_task(name_or_path: str, include: list[str | Path] = (), limit: int | None = None,
              cache_dir: str | Path | None = None) -> Task:
    path = task_path(name_or_path, include)
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise TaskError(f"{path}: not valid YAML: {e}") from None
    cfg = validate_config(cfg, str(path))
    split = cfg["test_split"]
    docs = load_split(cfg, split, path, cache_dir)
    if not docs:
        raise TaskError(f"{path}: split {split!r} of dataset {cfg['dataset_path']!r} is empty")
    fewshot_split = cfg.get("fewshot_split") or cfg.get("training_split") or cfg.get("validation_split") or split
    fewshot_docs = docs if fewshot_split == split else load_split(cfg, fewshot_split, path, cache_dir)
    task = Task(cfg["task"], str(path), cfg["output_type"], cfg["metric_list"], docs[:limit] if limit else docs,
                fewshot_docs, fewshot_split == split, cfg)
    _check_first_doc(task)
    return task


def validate_config(cfg: Any, source: str) -> dict:
    if not isinstance(cfg, dict):
        raise TaskError(f"{source}: a task file must be a mapping, got {type(cfg).__name__}")
    missing = [k for k in REQUIRED if k not in cfg and not (k == "dataset_path" and "local_data" in cfg)]
    if missing:
        raise TaskError(f"{source}: missing required field(s): {', '.join(missing)}")
    unknown = sorted(set(cfg) - KNOWN)
    if unknown:
        raise TaskError(f"{source}: unknown field(s): {', '.join(unknown)} (known: {', '.join(sorted(KNOWN))})")
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict) and kwargs.get("trust_remote_code"):
        raise TaskError(f"{source}: dataset_kwargs.trust_remote_code is refused (it runs the dataset repository's "
                        f"code): save the dataset with datasets' save_to_disk and set dataset_path to that directory")
    kind = cfg["output_type"]
    if kind not in METRICS:
        raise TaskError(f"{source}: output_type {kind!r} is not one of {', '.join(METRICS)}")
    if kind == "multiple_choice" and "doc_to_choice" not in cfg:
        raise TaskError(f"{source}: output_type multiple_choice needs doc_to_choice")
    if kind != "loglikelihood_rolling" and "doc_to_text" not in cfg:
        raise TaskError(f"{source}: output_type {kind} needs doc_to_text")
    metrics = cfg.get("metric_list") or [{"metric": m} for m in METRICS[kind]]
    for m in metrics:
        name = m.get("metric") if isinstance(m, dict) else None
        if name not in METRICS[kind]:
            raise TaskError(f"{source}: unknown metric {name!r} for output_type {kind} "
                            f"(supported: {', '.join(METRICS[kind])})")
    cfg["metric_list"] = metrics
    return cfg


def load_split(cfg: dict, split: str, path: Path, cache_dir: str | Path | None = None) -> list[dict]:
    """Rows of one split as plain dicts."""
    if "local_data" in cfg:
        from pretrain.evals.local_data import ensure_local_eval_data

        files = {split: ensure_local_eval_data(cache_dir) / f"{cfg['local_data']}.jsonl"}
        kind = "json"
    else:
        kind = cfg["dataset_path"]
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if kind in ("json", "csv", "parquet") and files is not None:
        files = files if isinstance(files, dict) else {split: files}
        if split not in files:
            raise TaskError(f"{path}: dataset_kwargs.data_files has no split {split!r} (has {', '.join(files)})")
        f = Path(files[split])
        f = f if f.is_absolute() else path.parent / f
        if not f.is_file():
            raise TaskError(f"{path}: data file {f} for split {split!r} does not exist")
        return _read_file(f, kind)
    import datasets

    if Path(path.parent, kind).is_dir() or Path(kind).is_dir():
        d = Path(kind) if Path(kind).is_dir() else path.parent / kind
        ds = datasets.load_from_disk(str(d))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise TaskError(f"{path}: saved dataset {d} has no split {split!r} (has {', '.join(ds)})")
            ds = ds[split]
        return list(ds)
    try:
        ds = datasets.load_dataset(kind, cfg.get("dataset_name"), split=split, **(cfg.get("dataset_kwargs") or {}))
    except Exception as e:  # hub unreachable, unknown name, ... : say which task and dataset
        raise TaskError(f"{path}: cannot load dataset {kind!r} ({cfg.get('dataset_name')}) split {split!r}: "
                        f"{type(e).__name__}: {e}") from None
    return list(ds)


def _read_file(f: Path, kind: str) -> list[dict]:
    if kind == "json":
        text = f.read_text(encoding="utf-8")
        if f.suffix == ".json" and text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if kind == "csv":
        with open(f, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    import pyarrow.parquet as pq

    return pq.read_table(f).to_pylist()


def _check_first_doc(task: Task) -> None:
    """Render the first item through every template so missing columns surface now."""
    doc = task.docs[0]
    task.text(doc)
    task.target(doc)
    if task.output_type == "multiple_choice":
        task.choices(doc)
