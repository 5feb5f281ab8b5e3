"""MAE's fine-tuning augmentation (data_pipelines/finetune_transform.py) against timm's
``create_transform`` called as the official util/datasets.py calls it."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing

from vitssl.data_pipelines.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform
from vitssl.train.config import ConfigError, load_config


def _image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))


def test_pipeline_is_rand_m9_mstd05_and_erasing_025() -> None:
    tf = build_transform("finetune", 32)
    ops = {type(t): t for t in tf.timm.transforms}  # type: ignore[attr-defined]
    ra, erase = ops[RandAugment], ops[RandomErasing]
    assert ra.num_layers == 2 and all(op.magnitude == 9 for op in ra.ops)
    assert all(op.magnitude_std == 0.5 for op in ra.ops)
    assert (erase.probability, erase.mode) == (0.25, "pixel")


def test_views_equal_the_official_call_under_the_same_seeds() -> None:
    official = create_transform(
        32,
        is_training=True,
        color_jitter=None,  # type: ignore[arg-type]
        auto_augment="rand-m9-mstd0.5-inc1",
        interpolation="bicubic",
        re_prob=0.25,
        re_mode="pixel",
        re_count=1,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )  # MAE util/datasets.py build_transform(is_train=True)
    tf = build_transform("finetune", 32)
    img = _image()
    for seed in range(20):
        torch.manual_seed(seed)
        random.seed(seed)
        np_before = np.random.get_state()[1].copy()
        (ours,) = tf(img)
        assert np.array_equal(np.random.get_state()[1], np_before)  # caller's numpy untouched
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(int(torch.randint(0, 2**31 - 1, ()).item()))
        ref = official(img)
        assert ours.shape == (3, 32, 32) and ours.dtype == torch.float32
        assert torch.equal(ours, ref), seed


def test_finetune_recipes_use_it_and_device_decoding_is_refused() -> None:
    cfg = load_config("mae_finetune_vit_base_in1k", [])
    assert cfg.data.augmentation == "finetune"
    with pytest.raises(ConfigError, match="decode_on_device=false"):
        load_config("mae_finetune_vit_base_in1k", ["data.decode_on_device=true"])
