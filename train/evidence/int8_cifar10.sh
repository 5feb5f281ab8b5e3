#!/usr/bin/env bash
# Issues 8 and 17 evidence: the INT8 artefact of each distilled CIFAR-10 student of
# distil_cifar10.sh. ONNX Runtime static QDQ quantization with every scheme of the recipe
# (u8s8, s8s8, u8s8_rr; per-channel weights, 128 calibration images from the train shards),
# verified and timed side by side on this CPU against FP32 (batch 1 and 32, 1 thread) on ONNX
# Runtime and OpenVINO; k-NN accuracy FP32 vs INT8 on the held-out images against a bank of
# train images; the artefact ships the fastest scheme meeting the bounds.
# Usage (repository root): train/evidence/int8_cifar10.sh [overrides]
#   [STUDENTS="resnet18 ..." BANK=10000 VAL=0]
set -u
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/evidence}
STUDENTS=${STUDENTS:-resnet18 mobilenetv2_100 efficientnet_lite0 mobilenetv4_conv_small mobilenetv3_large_100}
BANK=${BANK:-10000}
VAL=${VAL:-0}
for s in $STUDENTS; do
  $PY -m vitssl.train.edge_export artefact export_default model.checkpoint=$OUT/distil_$s \
    'data.train=data/cifar10/train/train-{000000..000008}.tar' \
    data.val=data/cifar10/val/val-000000.tar data.bank_limit=$BANK data.val_limit=$VAL \
    qat.enabled=false output_dir=$OUT/int8_$s "$@" 2>&1 | tee $OUT/int8_$s.log
  echo "int8 $s rc=${PIPESTATUS[0]}" | tee -a $OUT/summary.txt
done
