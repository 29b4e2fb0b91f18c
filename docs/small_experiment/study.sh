#!/usr/bin/env bash
# The fair small experiment of docs/small_experiment.md, every run of it: two runs at a time, one thread each.
#
#     bash docs/small_experiment/study.sh ~/.cache/gift runs/study     # DATA: prepare.py's --out
#
# Stage 1 chooses each method's learning rate on validation (seed 1, snips_words); stage 2 runs
# every (task, method) at its chosen rate with seeds 1 2 3 (seed 1 on snips_words is stage 1's).
# A finished run (its eval.json) is skipped, an interrupted one resumed: run the same command again after a stop.
# Then: python docs/small_experiment/table.py runs/study/*/* --per-seed   (and curves.py, see the docs)
set -euo pipefail
export DATA=${1:?usage: study.sh DATA OUT} OUT=${2:?usage: study.sh DATA OUT} OMP_NUM_THREADS=1
cd "$(dirname "$0")/../.."

run() {  # run TASK NAME SEED FLAGS...: one training run, its learning curve and its final evaluation
  local task=$1 name=$2 seed=$3 out=$OUT/$1/$2-s$3
  shift 3
  [ -f "$out/eval.json" ] && return 0
  mkdir -p "$OUT/logs"
  python train_llama.py --model "$DATA/SmolLM2-135M-Instruct" --data "$DATA/$task" --tasks "${task}_val" "$task" \
      --epochs 2 --batch-size 8 --micro-batch-size 8 --group-by-length --max-new-tokens 8 --eval-batch-size 16 \
      --eval-every 26 --val-limit 48 --seed "$seed" "$@" --out "$out" $([ -f "$out/checkpoint.pt" ] && echo --resume) \
      > "$OUT/logs/$task-$name-s$seed.log" 2>&1
}
export -f run

# The methods (parameters on SmolLM2-135M) and the learning rates tried for each in stage 1
declare -A FLAGS=([gift-qv]="--preset qv"                                                     # 147,456
                  [lora-qv-r3]="--method lora --targets attention.wq attention.wv --rank 3"   # 172,800
                  [lora-qkvud-r32]="--method lora"                                           # 6,635,520
                  [gift-qkvud]="--preset qkvud")                                             # 491,520
declare -A GRID=([gift-qv]="1e-3 3e-3" [lora-qv-r3]="1e-3 3e-3" [lora-qkvud-r32]="3e-4 1e-3" [gift-qkvud]="1e-3 3e-3")
METHODS="gift-qv lora-qv-r3 lora-qkvud-r32 gift-qkvud"

parallel() { xargs -P 2 -I{} bash -c "run {}"; }   # one line of arguments per run, two runs at a time

{ for m in $METHODS; do for lr in ${GRID[$m]}; do
    echo "snips_words $m-lr$lr 1 ${FLAGS[$m]} --lr $lr"; done; done
  for task in snips_words trec snips_index; do  # the base model, zero-shot
    echo "$task zero-shot 0 --eval-only"; done
} | parallel

choose() {  # the rate of method $1's stage-1 runs with the best final validation accuracy (a tie: the smaller)
  python3 - "$OUT/snips_words" "$1" <<'PY'
import json, sys
from pathlib import Path
accuracy = {}
for run in Path(sys.argv[1]).glob(f"{sys.argv[2]}-lr*-s1"):
    lr = run.name[len(sys.argv[2]) + 3:-3]
    accuracy[lr] = json.loads((run / "eval.json").read_text())["accuracy"]["snips_words_val"]
print(max(sorted(accuracy, key=float), key=accuracy.get))
PY
}
declare -A LR
for m in $METHODS; do LR[$m]=$(choose "$m"); echo "chosen on validation: $m lr ${LR[$m]}"; done

{ for m in $METHODS; do for seed in 2 3; do
    echo "snips_words $m-lr${LR[$m]} $seed ${FLAGS[$m]} --lr ${LR[$m]}"; done; done
  for task in trec snips_index; do for m in $METHODS; do for seed in 1 2 3; do  # snips_index: the index form
    echo "$task $m-lr${LR[$m]} $seed ${FLAGS[$m]} --lr ${LR[$m]}"; done; done; done
} | parallel
python3 docs/small_experiment/table.py "$OUT"/*/*-s* --per-seed
