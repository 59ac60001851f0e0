#!/usr/bin/env bash
# Every performance figure the README quotes, in one run (CPU; ~30 minutes on 2 cores).
# Each script prints a markdown table; ratios are measured within one script run.
set -euo pipefail
PY=${PY:-python}
cd "$(dirname "$0")/.."
run() { echo; echo "## $*"; echo; "$PY" "$@"; }
run benchmarks/bench_fakequant.py                       # fake-quant eval speed vs float
run benchmarks/bench_train_step.py --classes 100        # P4Q step: cached features vs live
run benchmarks/bench_text_memory.py                     # 1,000-class text step memory
# P4Q prompt step vs a plain CoOp step (time, kept memory, FLOP floor); BENCH_1000=1 adds the
# 1,000-class step (the plain step alone needs ~22 GB and minutes per step on a CPU)
run benchmarks/bench_prompt_step.py --classes 100 ${BENCH_1000:+1000}
run benchmarks/bench_text_ddp.py --classes 100        # class-sharded text: devices=2 vs 1
run benchmarks/bench_class_scaling.py --classes 100 300 1000 --chunked 1000  # step vs classes, peak RSS
run benchmarks/ddp_drift.py                             # DDP vs one process on the demo: drift, top-1 (not a timing)
run benchmarks/ddp_drift.py --presets w4a4 w8a8 --seeds 1 2 --no-control
run benchmarks/export_size.py                           # low-bit file sizes vs float32
run benchmarks/bench_int8.py --preset w8a8              # real int8 GEMMs vs float32
run benchmarks/bench_int8.py --preset p4q-448
# the kernel a CPU without VNNI gets (fbgemm would saturate there): torch._int_mm
echo; echo "## FBGEMM_ENABLE_INSTRUCTIONS=AVX2 benchmarks/bench_int8.py --preset w8a8"; echo
FBGEMM_ENABLE_INSTRUCTIONS=AVX2 "$PY" benchmarks/bench_int8.py --preset w8a8
run benchmarks/bench_calibration.py                     # ViT-B/32 calibration time, 1,280 images
# ONNX graph in onnxruntime vs its float graph and vs the int8 torch path (speed, size)
run benchmarks/bench_onnx.py --preset w8a8
run benchmarks/bench_onnx.py --preset w4a4
# ONNX graph vs the fake-quant student on the demo world (trains the demo's w8a8 and w4a4 runs)
run benchmarks/onnx_agreement.py
run benchmarks/bench_folder_index.py --rounds 5         # suite start: listed vs indexed folder
run benchmarks/bench_sweep_frozen.py                    # sweep: frozen work once (store) vs every run
run benchmarks/bench_text_checkpointing.py --classes 300 --chunk 100  # recomputation strategies vs unchunked
run benchmarks/baseline_costs.py                        # baselines: demo fit and ViT-B/32 step vs P4Q
run benchmarks/lora_merge.py                            # CLIP-LoRA side branch vs merged + re-quantized (not a timing)
