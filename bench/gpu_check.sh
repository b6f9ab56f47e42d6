#!/usr/bin/env bash
# The GPU figures for docs/performance.md in one call on one H100 / H200 (about 12 minutes):
# decoding.complete vs model.generate and one GRPO step (Llama-3.2-1B shape), then sft.py / dpo.py training
# throughput and MFU against plain transformers (1B; 1B with torch.compile; 1B with flex attention;
# 3B with activation checkpointing; 1B on Tülu 3-shaped lengths with and without --max_tokens_per_micro_batch),
# and packed_varlen attention against the dense mask.
#
#   make gpu-carry          # here, once: the bundled tokenizer and the langdetect wheel into .cache/gpu
#   bash bench/gpu_check.sh # there, from the repository root, with .cache/gpu carried along
#
# A GPU machine without hub access gets no bundled weights (the RL step needs only the tokenizer) and may
# lack langdetect (the IFEval verifier's case checks), hence .cache/gpu. Each part runs under its own time
# limit, so one that fails or hangs still leaves the others' figures. Logs go to $OUT (default
# output/gpu_check), one per part, each ending with its table or JSON report.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-output/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .cache/gpu/wheels/*.whl > /dev/null 2>&1 && ! python3 -c "import langdetect" 2> /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .cache/gpu/wheels/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

part() {  # part NAME SECONDS COMMAND...: run it with a time limit, log to $OUT/NAME.log, show the end
    local name=$1 limit=$2 started=$SECONDS
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - started)) s"
    grep -v -e '^\[rank' -e 'it/s\]' "$OUT/$name.log" | tail -n 14
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} | tee "$OUT/machine.txt"
part rlvr 170 python3 bench/bench_rlvr.py --model llama1b --tokenizer .cache/gpu
part train_1b 110 python3 bench/bench_train.py --models llama1b
part train_1b_compile 110 python3 bench/bench_train.py --models llama1b --compile --variants sft_packed dpo_packed
part train_1b_flex 60 python3 bench/bench_train.py --models llama1b --attn_implementation flex_attention \
    --variants sft_packed
part train_3b 120 python3 bench/bench_train.py --models llama3b --gradient_checkpointing
# --max_tokens_per_micro_batch and packed_varlen attention: the recipe's flags on Tülu 3-shaped lengths, then
# varlen flash attention against the dense-mask path on one packed row (bf16: differences near 1e-2 are rounding).
part train_1b_budget 150 python3 bench/bench_train.py --models llama1b --lengths tulu3 --gradient_checkpointing \
    --attn_implementation packed_varlen --variants sft_packed sft_budget dpo_packed dpo_budget
part packed_attention 60 python3 - <<'PY'
import torch, modeling
from transformers import LlamaConfig, LlamaForCausalLM
modeling.register_packed_attention()
torch.manual_seed(0)
config = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=2)
model = LlamaForCausalLM(config).cuda().to(torch.bfloat16)
lengths = [700, 35, 1200, 64, 9, 2000]
input_ids = torch.randint(0, 1000, (1, sum(lengths)), device="cuda")
position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).cuda()
results = {}
for attention in ("sdpa", modeling.PACKED_ATTENTION):
    model.set_attn_implementation(attention)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits.float()
    logits.log_softmax(-1)[..., 0].mean().backward()
    results[attention] = logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.float()
(dense, dense_grad), (packed, packed_grad) = results.values()
print("logits max |packed - dense|", (packed - dense).abs().max().item(), "of max", dense.abs().max().item())
print("q_proj grad relative difference", ((packed_grad - dense_grad).norm() / dense_grad.norm()).item())
PY
