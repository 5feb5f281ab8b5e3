#!/usr/bin/env bash
# Issue 7 evidence: distil a pretrained ViT-tiny teacher (default: the SimCLR run of
# methods_cifar10.sh) into MobileNetV3-Large with a CIFAR stem on the 45,000-image CIFAR-10
# train split, and train the same student from scratch with SimCLR for the same budget
# (STEPS x 64 images, fp32, one process). Distillation: cosine feature regression + SEED's
# relational loss on centred teacher class tokens (method.teacher_center); then train.distil_report compares teacher,
# distilled student and SimCLR student on the held-out split (k-NN, params, FLOPs, latency).
# Usage (repository root): train/evidence/distil_cifar10.sh   [TEACHER=runs/... STEPS=1000]
set -u
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-1000}
OUT=${OUT:-runs/evidence}
TEACHER=${TEACHER:-$OUT/simclr}
LIMIT=${LIMIT:-10000}
mkdir -p "$OUT"
COMMON="data.train_shards=data/cifar10/train train.steps=$STEPS train.micro_batch=64
 train.precision=fp32 train.zero=zero0 data.num_workers=1 optim.warmup_steps=30 optim.base_lr=4e-3
 checkpoint.every=100000 log.every=10 log.progress=false"
start=$(date +%s)
$PY -m train.distil distil_vit_tiny_to_mnv3_cifar $COMMON method.teacher=$TEACHER \
  method.teacher_pool=cls method.w_patch=0 method.teacher_center=0.9 train.output_dir=$OUT/distil_mnv3 > $OUT/distil_mnv3.log 2>&1
echo "distil rc=$? $(( $(date +%s) - start ))s" | tee -a $OUT/summary.txt
[ -n "${SKIP_SIMCLR:-}" ] || {
start=$(date +%s)
$PY -m train.pretrain simclr_vit_tiny_cifar $COMMON model.name=mobilenetv3_large_100 \
  model.cifar_stem=true train.output_dir=$OUT/simclr_mnv3 > $OUT/simclr_mnv3.log 2>&1
echo "simclr_mnv3 rc=$? $(( $(date +%s) - start ))s" | tee -a $OUT/summary.txt
}
$PY -m train.distil_report --encoder teacher=$TEACHER --encoder distilled=$OUT/distil_mnv3 \
  --encoder simclr=$OUT/simclr_mnv3 --train data/cifar10/train --val data/cifar10/val \
  --limit $LIMIT --threads 1 --out $OUT/distil_report > $OUT/distil_report.log 2>&1
echo "distil_report rc=$?" | tee -a $OUT/summary.txt
cat $OUT/distil_report/distil_report.md | tee -a $OUT/summary.txt
