#!/usr/bin/env bash
# Issue 8 evidence: the INT8 artefact of the distilled CIFAR-10 student of distil_cifar10.sh.
# ONNX Runtime static QDQ quantization (per-channel weights, 128 calibration images from the
# train shards), k-NN accuracy FP32 vs INT8 on the 5,000 held-out images against a
# 10,000-image bank, latency at batch 1 and 32 with 1 thread, file sizes.
# Usage (repository root): train/evidence/int8_cifar10.sh [overrides]  [STUDENT=runs/...
#   ACT=int8|uint8 NAME=...]; e.g. quant.symmetric_activations=false for asymmetric uint8
set -u
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/evidence}
STUDENT=${STUDENT:-$OUT/distil_mnv3}
ACT=${ACT:-uint8}
NAME=${NAME:-mnv3_$ACT}
$PY -m train.export artefact export_default model.checkpoint=$STUDENT \
  'data.train=data/cifar10/train/train-{000000..000008}.tar' \
  data.val=data/cifar10/val/val-000000.tar data.bank_limit=10000 data.val_limit=0 \
  quant.activation_type=$ACT output_dir=$OUT/int8_$NAME "$@" 2>&1 | tee $OUT/int8_$NAME.log
