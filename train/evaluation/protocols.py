"""One function per protocol; each reads its config, evaluates and writes ``<out>/<protocol>.*``.

Feature extraction is split across ranks (any launcher that sets ``RANK``/``WORLD_SIZE`` or
Slurm's variables); probes and files run on rank 0. Fine-tuning trains through
``vitssl.train.trainer.run`` and then scores the final checkpoint on ``data.val_shards``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vitssl.data_pipelines.labelled import NO_LABELS, LabelledReader, has_labels, open_source
from vitssl.models.distributed import rank, world_size
from vitssl.train.evaluation.config import EvalConfig
from vitssl.train.evaluation.encoders import PIXELS, Encoder, load_encoder
from vitssl.train.evaluation.features import Features, extract_features, run_model
from vitssl.train.evaluation.knn import knn_classify, topk_accuracy
from vitssl.train.evaluation.label_subsets import stratified_subset
from vitssl.train.evaluation.linear_probe import train_probe, train_probe_on_the_fly
from vitssl.train.evaluation.results import markdown_table, write_results

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def init_eval_distributed() -> torch.device:
    """Join the process group when launched with several ranks; the device of this rank."""
    from vitssl.train.dist_env import apply_dist_env, resolve_dist_env

    env = resolve_dist_env(os.environ)
    cuda = torch.cuda.is_available()
    if env.world_size > 1 and not dist.is_initialized():
        apply_dist_env(env)
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def check_labelled(spec: str, index: str | None) -> None:
    if not has_labels(spec, index or None):
        raise ValueError(f"{spec}: {NO_LABELS}")


class Session:
    """Encoders and their cached features for one command."""

    def __init__(self, cfg: EvalConfig) -> None:
        self.cfg = cfg
        self.device = init_eval_distributed()
        self.rank, self.world = rank(), world_size()
        self.out = Path(cfg.output_dir)
        e = cfg.encoder
        # The encoder first: a wrong checkpoint path is the likelier mistake, and its error
        # should not hide behind one about the (default) data.
        self.encoders = {"pretrained": self._load(random_init=False)}
        d = cfg.data
        check_labelled(d.train, d.train_index)
        check_labelled(d.val, d.val_index)
        first = self.encoders["pretrained"]
        if e.compare_random and first.kind not in ("random", PIXELS):
            self.encoders["random"] = self._load(random_init=True)
        if e.compare_pixels and first.kind != PIXELS:
            self.encoders[PIXELS] = load_encoder(PIXELS, img_size=first.arch.img_size)
        self._feats: dict[tuple[str, str], Features] = {}

    def _load(self, random_init: bool) -> Encoder:
        e = self.cfg.encoder
        enc = load_encoder(
            e.checkpoint,
            random_init=random_init,
            img_size=e.img_size,
            patch_size=e.patch_size,
            seed=e.seed,
        )
        enc.model.to(self.device)
        return enc

    def reader(self, split: str, limit: int | None = None) -> LabelledReader:
        d = self.cfg.data
        spec, index = (d.train, d.train_index) if split == "train" else (d.val, d.val_index)
        if limit is None:
            limit = (d.train_limit if split == "train" else d.val_limit) or None
        size = next(iter(self.encoders.values())).arch.img_size
        return LabelledReader(
            spec,
            size,
            index=index or None,
            rank=self.rank,
            world_size=self.world,
            batch_size=d.batch_size,
            num_workers=d.num_workers,
            limit=limit,
        )

    def features(self, name: str, split: str) -> Features:
        if (name, split) in self._feats:
            return self._feats[name, split]
        path = self._cache_path(name, split)
        if path is not None and path.is_file():
            log.info(f"reusing {split} features of the {name} encoder from {path}")
            saved = torch.load(path, weights_only=True)
            feats = Features(saved["feats"], saved["labels"], saved["classes"] or None)
        else:
            log.info(f"extracting {split} features of the {name} encoder")
            feats = extract_features(
                self.encoders[name].model,
                self.reader(split),
                self.device,
                self.cfg.encoder.pool,
                DTYPES[self.cfg.precision],
            )
            if path is not None and self.rank == 0:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                saved = {
                    "feats": feats.feats,
                    "labels": feats.labels,
                    "classes": feats.classes or [],
                }
                torch.save(saved, tmp)
                tmp.replace(path)
        self._feats[name, split] = feats
        return feats

    def _cache_path(self, name: str, split: str) -> Path | None:
        """Features depend on the weights, the pooling, the data and the precision only."""
        if not self.cfg.data.cache:
            return None
        d, e, enc = self.cfg.data, self.cfg.encoder, self.encoders[name]
        if split == "train":
            spec = (d.train, d.train_index, d.train_limit)
        else:
            spec = (d.val, d.val_index, d.val_limit)
        source = enc.describe()
        if enc.kind not in ("random", PIXELS):  # a re-written checkpoint gets new features
            source["mtime"] = Path(enc.source).stat().st_mtime
        key = json.dumps([source, e.pool, spec, self.cfg.precision], sort_keys=True, default=str)
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return self.out / "features" / f"{name}_{split}_{digest}.pt"

    def num_classes(self, train: Features, val: Features) -> int:
        n = train.num_classes
        top = max(int(train.labels.max()), int(val.labels.max()))
        if top >= n:
            raise ValueError(f"label {top} >= num_classes={n} (classes of {self.cfg.data.train})")
        return n

    def data_record(self) -> dict[str, Any]:
        d = self.cfg.data
        ntrain = open_source(d.train, d.train_index or None).num_samples
        nval = open_source(d.val, d.val_index or None).num_samples
        return {
            "train": d.train,
            "val": d.val,
            "train_samples": min(ntrain, d.train_limit or ntrain),
            "val_samples": min(nval, d.val_limit or nval),
        }

    def write(self, protocol: str, rows: list[dict[str, Any]], **extra: Any) -> None:
        if self.rank != 0:
            return
        ckpt = {k: v.describe() for k, v in self.encoders.items()}
        path = write_results(
            self.out, protocol, rows, self.cfg.to_dict(), ckpt, self.data_record(), extra
        )
        print(markdown_table(rows), flush=True)
        print(f"wrote {path} and {path.with_suffix('.md')}", flush=True)


def run_knn(cfg: EvalConfig) -> list[dict[str, Any]]:
    s = Session(cfg)
    rows = []
    for name in s.encoders:
        train, val = s.features(name, "train"), s.features(name, "val")
        res = knn_classify(
            train.feats,
            train.labels,
            val.feats,
            val.labels,
            s.num_classes(train, val),
            k=cfg.knn.k,
            temperature=cfg.knn.temperature,
            chunk_size=cfg.knn.chunk_size,
            device=s.device,
        )
        rows.append({"encoder": name, "k": cfg.knn.k, **res})
    s.write("knn", rows)
    return rows


def run_linear(cfg: EvalConfig) -> list[dict[str, Any]]:
    s = Session(cfg)
    rows = []
    for name in s.encoders:
        val = s.features(name, "val")
        if cfg.linear.on_the_fly:
            res = _linear_on_the_fly(s, name, val)
        else:
            train = s.features(name, "train")
            n = s.num_classes(train, val)
            res = (
                train_probe(
                    train.feats, train.labels, val.feats, val.labels, n, cfg.linear, cfg.seed
                )
                if s.rank == 0
                else {}
            )
        if s.rank == 0:
            per_lr = res.pop("per_lr")
            rows.append({"encoder": name, **res, "lrs": len(per_lr)})
    s.write("linear", rows)
    return rows


def _linear_on_the_fly(s: Session, name: str, val: Features) -> dict[str, Any]:
    """Heads on augmented images (RandomResizedCrop + flip, the ``mae`` preset) every epoch."""
    from vitssl.data_pipelines.loader import build_loader
    from vitssl.data_pipelines.transforms import build_transform
    from vitssl.models.backbones import embed, embed_dim

    enc = s.encoders[name]
    d = s.cfg.data
    loader = build_loader(
        d.train,
        transform=build_transform("mae", enc.arch.img_size),
        micro_batch=max(1, s.cfg.linear.batch_size // s.world),
        rank=s.rank,
        world_size=s.world,
        num_workers=d.num_workers,
        seed=s.cfg.seed,
        index_path=d.train_index or None,
        with_labels=True,
    )

    def batches(epoch: int) -> Any:
        loader.set_epoch(epoch)
        return iter(loader)

    def encode(x: torch.Tensor) -> torch.Tensor:
        return embed(enc.model, x.to(s.device), s.cfg.encoder.pool).cpu()

    n = val.num_classes
    return train_probe_on_the_fly(
        encode,
        batches,
        loader.batches_per_epoch,
        embed_dim(enc.model),
        val.feats,
        val.labels,
        n,
        s.cfg.linear,
        s.cfg.seed,
    )


def run_label_efficiency(cfg: EvalConfig) -> list[dict[str, Any]]:
    s = Session(cfg)
    le = cfg.label_efficiency
    rows = []
    for name in s.encoders:
        train, val = s.features(name, "train"), s.features(name, "val")
        n = s.num_classes(train, val)
        for fraction in sorted(le.fractions):
            sel = torch.from_numpy(stratified_subset(train.labels, fraction, le.seed))
            row: dict[str, Any] = {"encoder": name, "fraction": fraction, "labels": len(sel)}
            if "knn" in le.protocols:
                res = knn_classify(
                    train.feats[sel],
                    train.labels[sel],
                    val.feats,
                    val.labels,
                    n,
                    k=min(cfg.knn.k, len(sel)),
                    temperature=cfg.knn.temperature,
                    weightings=("distance",),
                    chunk_size=cfg.knn.chunk_size,
                    device=s.device,
                )
                row["knn_top1"] = res["distance/top1"]
            if "linear" in le.protocols and s.rank == 0:
                settings = replace(
                    cfg.linear, batch_size=min(cfg.linear.batch_size, max(2, len(sel)))
                )
                feats, labels = train.feats[sel], train.labels[sel]
                res = train_probe(feats, labels, val.feats, val.labels, n, settings, cfg.seed)
                row["linear_top1"] = res["top1"]
            rows.append(row)
            log.info(f"{name} {fraction:g}: {row}")
    if s.rank == 0:
        s.out.mkdir(parents=True, exist_ok=True)
        _plot_label_efficiency(rows, s.out / "label_efficiency.png")
    s.write("label_efficiency", rows, plot="label_efficiency.png")
    return rows


def _plot_label_efficiency(rows: list[dict[str, Any]], path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from vitssl.train.evaluation.pictures import _pyplot, save_figure

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name in dict.fromkeys(r["encoder"] for r in rows):
        mine = [r for r in rows if r["encoder"] == name]
        for metric, style in (("knn_top1", "o-"), ("linear_top1", "s--")):
            if metric in mine[0]:
                ax.plot(
                    [100 * r["fraction"] for r in mine],
                    [r[metric] for r in mine],
                    style,
                    label=f"{name} {metric.split('_')[0]}",
                )
    ax.set_xscale("log")
    ax.set_xlabel("labels used (%)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with SummaryWriter(str(path.parent / "tb")) as writer:
        save_figure(fig, path, writer, "label_efficiency")


def run_pictures(cfg: EvalConfig) -> list[dict[str, Any]]:
    from torch.utils.tensorboard import SummaryWriter
    from torchvision.utils import save_image

    from vitssl.train.evaluation.knn import topk_neighbours
    from vitssl.train.evaluation.pictures import (
        embedding_plot,
        mae_reconstructions,
        neighbour_grid,
        save_figure,
    )

    cfg = replace(cfg, encoder=replace(cfg.encoder, compare_random=False))
    s = Session(cfg)
    p = cfg.pictures
    val, train = s.features("pretrained", "val"), s.features("pretrained", "train")
    if s.rank != 0:
        return []
    s.out.mkdir(parents=True, exist_ok=True)
    made: list[dict[str, Any]] = []
    with SummaryWriter(str(s.out / "tb")) as writer:
        m = min(p.tsne_samples, val.feats.shape[0])
        for kind, fig in embedding_plot(
            val.feats[:m], val.labels[:m], val.classes, cfg.seed
        ).items():
            save_figure(fig, s.out / f"{kind}.png", writer, f"embeddings/{kind}")
            made.append({"picture": f"{kind}.png", "what": f"{kind} of {m} val embeddings"})
        single = LabelledReader(
            cfg.data.val, s.encoders["pretrained"].arch.img_size, index=cfg.data.val_index or None
        )
        step = max(1, val.feats.shape[0] // p.queries)
        qidx = list(range(0, step * p.queries, step))[: p.queries]
        k = min(p.neighbours, train.feats.shape[0])
        _, nidx = topk_neighbours(val.feats[qidx], train.feats, k, chunk_size=cfg.knn.chunk_size)
        queries = single.read(qidx)
        bank = s.reader("train")
        bank_imgs = bank.read(nidx.flatten().tolist())
        fig = neighbour_grid(
            queries["image"],
            queries["label"],
            bank_imgs["image"].view(len(qidx), k, *bank_imgs["image"].shape[1:]),
            bank_imgs["label"].view(len(qidx), k),
            train.classes,
        )
        save_figure(fig, s.out / "knn_neighbours.png", writer, "knn/neighbours")
        made.append({"picture": "knn_neighbours.png", "what": f"{len(qidx)} queries, top-{k}"})
        imgs = single.read(list(range(min(p.mae_images, val.feats.shape[0]))))["image"]
        grid = mae_reconstructions(cfg.encoder.checkpoint, imgs)
        if grid is not None:
            save_image(grid, s.out / "mae_reconstructions.png")
            writer.add_image("mae/reconstructions", grid, 0)
            made.append(
                {
                    "picture": "mae_reconstructions.png",
                    "what": "rows: original, masked input, reconstruction",
                }
            )
    s.write("pictures", made)
    return made


# ---------------------------------------------------------------- fine-tuning


def check_finetune(cfg: Any) -> None:
    """Refuse a fine-tune run before any process starts training."""
    if cfg.method.name != "finetune":
        raise ValueError(
            f"a fine-tune recipe needs method.name = 'finetune', not {cfg.method.name!r}"
        )
    if not cfg.data.val_shards:
        raise ValueError("fine-tuning needs data.val_shards (labelled) to report accuracy")
    for spec, index in ((cfg.data.train_shards, cfg.data.index), (cfg.data.val_shards, "")):
        check_labelled(spec, index or None)
        classes = open_source(spec, index or None).classes
        if classes is not None and len(classes) > cfg.method.num_classes:
            raise ValueError(
                f"{spec} has {len(classes)} classes: label {len(classes) - 1} >= "
                f"method.num_classes={cfg.method.num_classes}"
            )


def run_finetune(cfg: Any) -> int:
    """Train with ``vitssl.train.trainer.run``, then top-1/top-5 of the final weights on val."""
    from vitssl.models.pretrained import load_strict
    from vitssl.models.registry import create_method
    from vitssl.train.trainer import init_distributed, run
    from vitssl.train.weights import consolidated_state_dict, resolve_checkpoint

    check_finetune(cfg)
    code = run(cfg)
    if code != 0:
        return code
    rank, size, device = init_distributed()
    run_dir = Path(cfg.train.output_dir)
    ckpt = resolve_checkpoint(run_dir)
    eval_cfg = replace(cfg.method, init="")
    model_cfg = replace(cfg.model, drop_path_rate=0.0, grad_checkpointing=False)
    method = create_method(eval_cfg, model_cfg)
    load_strict(method, consolidated_state_dict(ckpt), str(ckpt), cfg.model.name)
    method.to(device).eval()
    reader = LabelledReader(
        cfg.data.val_shards,
        cfg.model.img_size,
        rank=rank,
        world_size=size,
        batch_size=cfg.train.micro_batch,
        num_workers=cfg.data.num_workers,
    )
    out = run_model(method.logits, reader, device, out_dtype=torch.float32)  # type: ignore[arg-type]
    if int(out.labels.max()) >= cfg.method.num_classes:
        raise ValueError(f"label {int(out.labels.max())} >= method.num_classes")
    acc = topk_accuracy(out.feats, out.labels)
    if rank == 0:
        steps = json.loads((run_dir / "run_plan.json").read_text())["steps"]  # from epochs
        row = {"init": cfg.method.init or "random", "steps": steps, **acc}
        record = {"source": str(ckpt), "init": cfg.method.init or "random"}
        data = {
            "train": cfg.data.train_shards,
            "val": cfg.data.val_shards,
            "val_samples": reader.num_samples,
        }
        path = write_results(run_dir, "finetune", [row], cfg.to_dict(), record, data)
        print(markdown_table([row]), flush=True)
        print(f"wrote {path}", flush=True)
    return 0
