#!/usr/bin/env bash
# Issue 5 evidence: each method pretrains ViT-tiny (32 px, patch 8) on the 45,000-image
# CIFAR-10 train split for the same short budget (STEPS x 64 images, fp32, one process),
# then the evaluation suite's k-NN compares it with a randomly initialised encoder of the
# same architecture on the held-out split. Short-budget settings: peak lr 5e-4 (base 2e-3
# per 256; SimSiam keeps its recipe's 1e-3: at 2e-3 it collapsed, RankMe 1.8), 30 warm-up
# steps, EMA momentum 0.95 -> 1 (the papers' 0.99-0.996 assume hundreds of epochs), no MoCo
# queue; BYOL and SimSiam with a 10x predictor lr (Tian et al., 2021: a predictor that lags
# the encoder lets them collapse early; at 300 steps BYOL 24.8 -> 27.6, SimSiam 26.4 -> 28.2)
# and SimSiam with AdamW weight decay 0.05 (5e-4 is SGD's); DINO with 2 local crops, 256
# prototypes and Sinkhorn-Knopp teacher targets at temperature 0.02 (DINOv2's centering: the
# EMA center swung the teacher between one-hot and uniform; 300 steps at base lr 1e-3:
# 25.5 -> 27.9), evaluated on its teacher; MAE at patch 4 without norm_pix_loss (pixel
# targets keep colour, which k-NN on CIFAR uses), evaluated on mean-pooled tokens.
# Usage (repository root): train/evidence/methods_cifar10.sh   [STEPS=300 METHODS="simclr byol"]
# EXTRA="key=value ..." appends overrides to every run (e.g. EXTRA=train.precision=bf16).
set -u
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-300}
OUT=${OUT:-runs/evidence}
BANK=${BANK:-10000}
QUERIES=${QUERIES:-2000}
mkdir -p "$OUT"
COMMON="model.name=vit_tiny_patch16_224 model.img_size=32 model.patch_size=8 model.cifar_stem=false
 data.train_shards=data/cifar10/train train.steps=$STEPS train.micro_batch=64 train.precision=fp32
 train.zero=zero0 data.num_workers=1 optim.warmup_steps=30 optim.base_lr=2e-3 checkpoint.every=100000
 log.every=10 log.image_every=0 log.progress=false"
for m in ${METHODS:-simclr mocov3 byol simsiam dino mae}; do
  POOL=cls
  case $m in
    simclr) R=simclr_vit_tiny_cifar; X="";;
    mocov3) R=mocov3_vit_tiny_cifar; X="method.queue_size=0 method.momentum=0.95";;
    byol) R=byol_vit_tiny_cifar; X="method.momentum=0.95 method.predictor_lr_scale=10";;
    simsiam) R=simsiam_resnet18_cifar; X="optim.base_lr=1e-3 method.predictor_lr_scale=10 optim.weight_decay=0.05";;
    dino) R=dino_vit_tiny_cifar; X="method.momentum=0.95 data.local_crops=2 method.freeze_last_layer=0.01
          method.out_dim=256 method.centering=sinkhorn_knopp method.teacher_temp=0.02 method.warmup_teacher_temp=0.02";;
    mae) R=mae_vit_tiny_cifar; X="model.patch_size=4 optim.base_lr=1.5e-3 method.norm_pix_loss=false"; POOL=avg;;
    *) echo "unknown method $m" >&2; exit 2;;
  esac
  start=$(date +%s)
  $PY -m vitssl.train.pretrain $R $COMMON $X ${EXTRA:-} train.output_dir=$OUT/$m > $OUT/$m.log 2>&1
  rc=$?
  echo "$m pretrain rc=$rc $(( $(date +%s) - start ))s" | tee -a $OUT/summary.txt
  [ $rc -eq 0 ] || continue
  $PY -m vitssl.train.evaluate knn eval_cifar10 encoder.checkpoint=$OUT/$m output_dir=$OUT/eval_$m \
     encoder.pool=$POOL data.train_limit=$BANK data.val_limit=$QUERIES > $OUT/$m.eval.log 2>&1
  echo "$m eval rc=$?" | tee -a $OUT/summary.txt
  tail -3 $OUT/$m.eval.log | head -2 | tee -a $OUT/summary.txt
done
