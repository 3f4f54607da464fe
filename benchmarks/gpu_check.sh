#!/usr/bin/env bash
# gpu_check.sh: the GPU paths of this project on ONE fresh CUDA machine (H100/H200), in <= 8 minutes wall.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine, from the project root
#   bash benchmarks/gpu_check.sh --dry-run   # the same stages on CPU with tiny sizes (CI: tests/test_gpu_check.py)
#
# Stages (each bounded by `timeout` and by what is left of BUDGET_S; a failed stage does not stop the others):
#   env            machine, driver, torch
#   install-*      the CUDA build of torch (requirements/cpu.txt's pin), then the requirements with torch held,
#                  then a prebuilt flash-attn wheel if one exists (never a source build)
#   probes         benchmarks/gpu_probes.py: SDPA/flash kernel per attention case; per engine and layout with
#                  train.precision=bf16 the dtype its linear layers compute in, forwards per pipeline step and host
#                  syncs per step (1-rank layouts on the GPU; pp2/ep2/tp2+sp on 2 CPU ranks over gloo: one GPU
#                  cannot hold two NCCL ranks); bf16-vs-fp32 loss parity of the 125M config
#   bench          benchmarks/gpu_train.py: numerics checks, then bf16 training of the 125M, 350M and 1.3B configs
#                  with sdpa and flash_attn (when importable): tokens/s and MFU
#   e2e            pretrain tokenizer -> prepare -> train (checkpoint) -> train --resume auto, bf16 on cuda
#   table          one table of everything (also in $OUT/table.txt)
#
# Environment: OUT (default ./gpu_check_out), BUDGET_S (default 470), WORK (scratch), PY (interpreter; default:
# .venv/bin/python in --dry-run, else a fresh venv), SKIP_INSTALL=1, TORCH_SPEC (e.g. "torch==2.13.0").
# Exit code: 0 when every essential stage (probes, bench, e2e; torch with CUDA on a GPU) passed, else 1.

set -o pipefail
DRY=0
[ "${1:-}" = --dry-run ] && { DRY=1; shift; }
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
OUT=${OUT:-$ROOT/gpu_check_out}
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
BUDGET_S=${BUDGET_S:-470}
mkdir -p "$OUT/stages" "$WORK"
DEADLINE=$(($(date +%s) + BUDGET_S))
STAGES=$OUT/stages.tsv
printf 'stage\tstatus\trc\tseconds\n' > "$STAGES"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DS_BUILD_OPS=0
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ $DRY = 1 ]; then
  DEVICE=cpu TINY=--tiny SKIP_INSTALL=1 LOCAL_LAYOUTS=local,zero1
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} CUDA_VISIBLE_DEVICES=""
  PY=${PY:-$([ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || command -v python3)}
else
  DEVICE=cuda TINY="" LOCAL_LAYOUTS=local,zero1
  if [ -z "${PY:-}" ]; then
    python3 -m venv --system-site-packages "$WORK/venv" && PY=$WORK/venv/bin/python || PY=$(command -v python3)
  fi
fi
export PY DEVICE TINY OUT WORK

stage() {  # stage NAME CAP_S COMMAND...: run bounded by CAP_S and the budget; record status, rc and seconds
  local name=$1 cap=$2 left start rc st
  shift 2
  left=$((DEADLINE - $(date +%s) - 5))
  if ((left < 10)); then
    printf '%s\tskipped\t-\t0\n' "$name" >> "$STAGES"
    return 99
  fi
  echo "=== [$name] $(date +%T), limit $((cap < left ? cap : left)) s"
  start=$(date +%s)
  timeout -k 5 $((cap < left ? cap : left)) "$@" > "$OUT/stages/$name.log" 2>&1
  rc=$?
  if ((rc == 0)); then st=ok; elif ((rc == 124 || rc == 137)); then st=timeout; else st=fail; fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$st" "$rc" "$(($(date +%s) - start))" >> "$STAGES"
  [ $st = ok ] || tail -n 30 "$OUT/stages/$name.log"
  return $rc
}

pipi() { "$PY" -m pip install --progress-bar off --prefer-binary --timeout 30 --retries 1 "$@"; }

s_env() {
  date; uname -a; nproc; nvidia-smi || echo "no nvidia-smi"
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
  "$PY" benchmarks/gpu_probes.py env --device "$DEVICE" --out "$OUT/env.json"
}

s_install_torch() {
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null && exit 0
  local spec=${TORCH_SPEC:-$(grep -E '^torch==' requirements/cpu.txt | head -n 1)}
  pipi --ignore-installed "${spec:-torch}" || pipi torch || exit 4
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 5)'
}

s_install_reqs() {
  "$PY" -c 'import importlib.metadata as m; print("torch==" + m.version("torch").split("+")[0])' > "$WORK/hold.txt"
  grep -v -E '^torch==' requirements/cpu.txt > "$WORK/req.txt"
  pipi -r "$WORK/req.txt" -c "$WORK/hold.txt" || exit 6
  pipi --only-binary=:all: -c "$WORK/hold.txt" flash-attn || echo "no prebuilt flash-attn wheel: sdpa only"
}

s_probes() {
  local rc=0
  "$PY" benchmarks/gpu_probes.py attention --device "$DEVICE" $TINY --out "$OUT/attention.json" || rc=1
  "$PY" -m torch.distributed.run --nproc-per-node 1 benchmarks/gpu_probes.py steps --device "$DEVICE" $TINY \
    --layouts "$LOCAL_LAYOUTS" --out "$OUT/steps_$DEVICE.json" || rc=1
  "$PY" -m torch.distributed.run --nproc-per-node 2 benchmarks/gpu_probes.py steps --device cpu $TINY \
    --layouts pp2,ep2,tp2_sp --out "$OUT/steps_2ranks_cpu.json" || rc=1
  "$PY" benchmarks/gpu_probes.py parity --device "$DEVICE" $TINY --out "$OUT/parity.json" || rc=1
  exit $rc
}

s_bench() {
  if [ $DRY = 1 ]; then
    "$PY" benchmarks/gpu_train.py --device cpu --dry-run --models 125m --backends sdpa --compile off \
      --checkpointing off --skip-checks --out "$OUT/bench.json"
  else
    "$PY" benchmarks/gpu_train.py --models 125m,350m,1.3b --backends sdpa,flash_attn --compile off \
      --checkpointing off --budget-s 150 --out "$OUT/bench.json"
  fi
}

s_e2e() {
  local W=$WORK/e2e steps=40 more=60 log
  [ $DRY = 1 ] && steps=4 more=6
  rm -rf "$W" && mkdir -p "$W"
  "$PY" benchmarks/gpu_probes.py corpus --out "$W/corpus.jsonl" $TINY || exit 10
  "$PY" -m pretrain.cli tokenizer --input "$W/corpus.jsonl" --vocab-size 512 --model-type bpe --output "$W/tok" \
    --quiet || exit 11
  "$PY" -m pretrain.cli prepare --input "$W/corpus.jsonl" --tokenizer "$W/tok/tokenizer.model" \
    --output "$W/shards/synth" --workers 2 --append-eod --no-progress || exit 12
  local common=(configs/gpt_tiny.yaml "data.train=[$W/shards/synth]" "data.tokenizer=$W/tok/tokenizer.model"
                model.vocab_size=512 train.precision=bf16 "train.device=$DEVICE" logging.tensorboard=false
                logging.interval=2 train.eval_interval=0 data.num_workers=2 "checkpoint.dir=$W/ckpt"
                "checkpoint.interval=$steps" train.global_batch_size=8 train.micro_batch_size=4)
  [ $DRY = 1 ] && common+=(model.hidden_size=64 model.num_layers=2 data.seq_length=32 model.max_seq_len=32)
  "$PY" -m pretrain.cli train "${common[@]}" "train.steps=$steps" || exit 13
  log=$("$PY" -m pretrain.cli train "${common[@]}" "train.steps=$more" --resume auto 2>&1) || { echo "$log"; exit 14; }
  echo "$log" | tail -n 5
  echo "$log" | grep -q "resumed from" || { echo "the second run did not resume from the checkpoint"; exit 15; }
  echo "ok: $steps steps, checkpoint, resumed to step $more on $DEVICE (bf16)" > "$OUT/e2e.txt"
}

export -f stage pipi s_env s_install_torch s_install_reqs s_probes s_bench s_e2e
export DRY LOCAL_LAYOUTS STAGES DEADLINE

code=0
stage env 60 bash -c s_env
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  stage install-torch 200 bash -c s_install_torch || code=1
  stage install-reqs 150 bash -c s_install_reqs
fi
stage probes 240 bash -c s_probes || code=1
stage bench 200 bash -c s_bench || code=1
stage e2e 150 bash -c s_e2e || code=1
"$PY" benchmarks/gpu_probes.py table "$OUT" | tee "$OUT/table.txt"
echo "gpu_check: $([ $code = 0 ] && echo PASS || echo FAIL) (logs in $OUT/stages/)"
exit $code
