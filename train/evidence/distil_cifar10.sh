#!/usr/bin/env bash
# Issues 7 and 17 evidence: distil a pretrained ViT-tiny teacher (default: the SimCLR run of
# methods_cifar10.sh) into each edge student with a CIFAR stem, all on the same budget (STEPS x
# 64 images of the 45,000-image CIFAR-10 train split, fp32, one process), then compare teacher
# and students on the held-out split with train.distil_report (k-NN, params, FLOPs, latency).
# Distillation: cosine feature regression + SEED's relational loss on centred teacher class
# tokens (method.teacher_center). With SIMCLR_BASELINE=1 the first student is also trained from
# scratch with SimCLR for the same budget. Each student's INT8 speed-up comes from
# int8_cifar10.sh (scheme chosen by measurement) and train.edge.bench_students.
# Usage (repository root): train/evidence/distil_cifar10.sh
#   [TEACHER=runs/... STEPS=300 STUDENTS="resnet18 mobilenetv2_100 ..." LIMIT=10000]
# EXTRA="key=value ..." appends overrides to every run (e.g. EXTRA=train.precision=bf16).
set -u
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-300}
OUT=${OUT:-runs/evidence}
TEACHER=${TEACHER:-$OUT/simclr}
LIMIT=${LIMIT:-10000}
STUDENTS=${STUDENTS:-resnet18 mobilenetv2_100 efficientnet_lite0 mobilenetv4_conv_small mobilenetv3_large_100}
mkdir -p "$OUT"
COMMON="data.train_shards=data/cifar10/train train.steps=$STEPS train.micro_batch=64
 train.precision=fp32 train.zero=zero0 data.num_workers=1 optim.warmup_steps=$(( STEPS / 10 ))
 optim.base_lr=4e-3 checkpoint.every=100000 log.every=10 log.progress=false"
ENCODERS="--encoder teacher=$TEACHER"
for s in $STUDENTS; do
  start=$(date +%s)
  $PY -m vitssl.train.distil distil_vit_tiny_to_mnv3_cifar $COMMON model.name=$s method.teacher=$TEACHER \
    method.teacher_pool=cls method.w_patch=0 method.teacher_center=0.9 \
    ${EXTRA:-} train.output_dir=$OUT/distil_$s > $OUT/distil_$s.log 2>&1
  echo "distil $s rc=$? $(( $(date +%s) - start ))s" | tee -a $OUT/summary.txt
  ENCODERS="$ENCODERS --encoder $s=$OUT/distil_$s"
done
if [ -n "${SIMCLR_BASELINE:-}" ]; then
  s=${STUDENTS%% *}
  $PY -m vitssl.train.pretrain simclr_vit_tiny_cifar $COMMON model.name=$s model.cifar_stem=true \
    ${EXTRA:-} train.output_dir=$OUT/simclr_$s > $OUT/simclr_$s.log 2>&1
  echo "simclr_$s rc=$?" | tee -a $OUT/summary.txt
  ENCODERS="$ENCODERS --encoder simclr_$s=$OUT/simclr_$s"
fi
$PY -m vitssl.train.distil_report $ENCODERS --train data/cifar10/train --val data/cifar10/val \
  --limit $LIMIT --threads 1 --out $OUT/distil_report > $OUT/distil_report.log 2>&1
echo "distil_report rc=$?" | tee -a $OUT/summary.txt
cat $OUT/distil_report/distil_report.md | tee -a $OUT/summary.txt
