"""`cbir train`: split, cache views, train, validate every epoch, keep the best, stop early, resume.

Files written beside MODEL.pt: MODEL.last.pt (resume state), MODEL.split.csv, MODEL.loss.png.
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cbir.device import configure_threads, resolve_device
from cbir.encoders.base import library_versions
from cbir.errors import CbirError
from cbir.training import models
from cbir.training.data import cache_views, load_collection, stratified_split, write_split


@dataclass
class TrainConfig:
    kind: str  # siamese | autoencoder
    data: str
    out: str
    labels: str = "auto"
    epochs: int | None = None
    batch_size: int | None = None
    image_size: int | None = None
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    backbone: str = "efficientnet_lite0"
    emb_dim: int = 256
    margin: float = 1.0
    lr: float | None = None
    patience: int = 5
    views: int | None = None
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def _defaults(cfg: TrainConfig) -> None:
    if cfg.kind not in ("siamese", "autoencoder"):
        raise CbirError(f"cbir train: unknown model kind {cfg.kind!r}; use siamese or autoencoder")
    seed_cnn = cfg.kind == "siamese" and cfg.backbone == "seed-cnn"
    if cfg.kind == "siamese":
        defaults = {"epochs": 40 if seed_cnn else 30, "batch_size": 64, "image_size": 128 if seed_cnn else 224,
                    "lr": 1e-3 if seed_cnn else 3e-4, "views": 4}
    else:
        defaults = {"epochs": 30, "batch_size": 32, "image_size": 128, "lr": 2e-3, "views": 3}
    for name, value in defaults.items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, value)
    for name in ("epochs", "batch_size", "image_size", "views"):
        if getattr(cfg, name) < 1:
            raise CbirError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.batch_size < 4:
        raise CbirError("--batch-size must be at least 4 (pairs need company)")
    if abs(sum(cfg.split) - 1.0) > 1e-6 or min(cfg.split[:2]) <= 0:
        raise CbirError("--split must be three fractions (train,val,test) that add up to 1, train and val > 0")


def contrastive_loss(emb: torch.Tensor, labels: torch.Tensor, margin: float, hard: int = 8) -> torch.Tensor:
    """Contrastive loss on L2-normalised embeddings, all positive pairs and the hardest negatives per anchor.

    positive pair: d^2; negative pair: max(0, margin - d)^2, with d the Euclidean distance.
    """
    z = F.normalize(emb, dim=1)
    d = torch.cdist(z, z).clamp_min(1e-9)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    pos = same & ~eye
    neg = ~same
    pos_loss = (d.pow(2) * pos).sum() / pos.sum().clamp_min(1)
    neg_d = d.masked_fill(~neg, float("inf"))
    k = min(hard, int(neg.sum(1).min().item())) if neg.any() else 0
    if k == 0:
        return pos_loss
    hardest = neg_d.topk(k, dim=1, largest=False).values
    neg_loss = F.relu(margin - hardest).pow(2).mean()
    return pos_loss + neg_loss


def precision_at_k(queries: np.ndarray, gallery: np.ndarray, q_labels: np.ndarray, g_labels: np.ndarray,
                   q_index_in_gallery: np.ndarray, k: int = 10) -> float:
    sims = queries @ gallery.T
    sims[np.arange(len(queries)), q_index_in_gallery] = -np.inf
    top = np.argsort(-sims, axis=1)[:, :k]
    return float((g_labels[top] == q_labels[:, None]).mean())


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        _defaults(cfg)
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.last_path = self.out.with_suffix(".last.pt")
        self.device = resolve_device(cfg.device)
        configure_threads()
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        random.seed(cfg.seed)

    # ---------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        started = time.perf_counter()
        coll = load_collection(cfg.data, cfg.labels)
        split = cfg.extra.get("assignments") or stratified_split(coll, cfg.split, cfg.seed)
        if len(split) != len(coll.files):
            raise CbirError("the given split does not match the collection")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        write_split(self.out.with_suffix(".split.csv"), coll, split)
        if cfg.resume and not self.last_path.is_file():
            raise CbirError(f"--resume: no interrupted run to continue ({self.last_path} not found)")
        if not cfg.resume and self.last_path.is_file():
            self.last_path.unlink()

        arch = self._arch()
        if cfg.kind == "siamese":
            net, pre = models.build_siamese(arch, pretrained=cfg.extra.get("backbone_weights", "imagenet"))
            trunk, trainable = net.trunk, net.trainable()
        else:
            net, pre = models.build_autoencoder(arch, pretrained=cfg.extra.get("backbone_weights", "imagenet"))
            trunk, trainable = net.trunk, net.trainable()
        for p in trunk.parameters():
            p.requires_grad_(False)

        use = np.array([s in ("train", "val") for s in split])
        files = [f for f, u in zip(coll.files, use, strict=True) if u]
        sub = type(coll)(coll.root, files, [lab for lab, u in zip(coll.labels, use, strict=True) if u]
                         if coll.labels else None)
        sub_split = [s for s, u in zip(split, use, strict=True) if u]
        cached, ok = cache_views(sub, pre, trunk, cfg.views, cfg.seed, self.device, progress=cfg.progress)
        self.cached = cached
        self.is_train = np.array([s == "train" for s in sub_split]) & ok
        self.is_val = np.array([s == "val" for s in sub_split]) & ok
        if self.is_train.sum() < 2 or self.is_val.sum() < 1:
            raise CbirError("too few decodable images to train (need at least 2 for training and 1 to validate)")
        names = sorted(set(sub.labels)) if sub.labels else None
        self.labels = (np.array([names.index(lab) for lab in sub.labels]) if names
                       else np.arange(len(sub.files)))
        self.has_labels = names is not None

        net.to(self.device)
        opt = torch.optim.AdamW([p for p in trainable.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=2)
        history: list[dict[str, float]] = []
        best, best_epoch, start_epoch = -math.inf, 0, 0
        baseline = self.validate(net)
        if cfg.resume:
            state = torch.load(self.last_path, map_location="cpu", weights_only=True)
            net.load_state_dict(state["state_dict"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            history, best, best_epoch = state["history"], state["best"], state["best_epoch"]
            start_epoch = state["epoch"]
            baseline = state["baseline"]
            print(f"resuming after epoch {start_epoch} (best {best:.4f} at epoch {best_epoch})", file=sys.stderr)
        metric_name = self.metric_name
        print(f"{cfg.kind} ({arch.get('backbone', 'conv')}): {int(self.is_train.sum())} train / "
              f"{int(self.is_val.sum())} val images; before training: val {metric_name} {baseline:.4f}",
              file=sys.stderr)

        interrupted = False
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _interrupt)
        epoch = start_epoch
        try:
            for epoch in range(start_epoch + 1, cfg.epochs + 1):
                loss, ips = self.train_epoch(net, opt, epoch)
                score = self.validate(net)
                sched.step(score)
                history.append({"epoch": epoch, "loss": loss, "val": score, "images_per_s": ips,
                                "lr": opt.param_groups[0]["lr"]})
                improved = score > best
                if improved:
                    best, best_epoch = score, epoch
                    self._save_model(net, arch, pre, coll, history, baseline, best, best_epoch, started)
                self._save_last(net, opt, sched, history, best, best_epoch, epoch, baseline)
                print(f"epoch {epoch:>3}/{cfg.epochs}  loss {loss:.4f}  val {metric_name} {score:.4f}"
                      f"{'  (best)' if improved else ''}  {ips:.0f} img/s", file=sys.stderr)
                if epoch - best_epoch >= cfg.patience:
                    print(f"early stop: no better val {metric_name} for {cfg.patience} epochs", file=sys.stderr)
                    break
        except KeyboardInterrupt:
            interrupted = True
            print(f"\ninterrupted in epoch {epoch}; {self.out} holds the best model so far "
                  f"(cbir train ... --resume continues)", file=sys.stderr)
            if best == -math.inf:
                self._save_model(net, arch, pre, coll, history, baseline, baseline, 0, started)
        finally:
            signal.signal(signal.SIGTERM, previous)
        self._plot(history)
        return {"best_val": best, "best_epoch": best_epoch, "baseline_val": baseline, "metric": metric_name,
                "epochs_run": len(history), "seconds": time.perf_counter() - started, "interrupted": interrupted,
                "out": str(self.out)}

    # ---------------------------------------------------------------------------------------------
    def _arch(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.kind == "siamese":
            return {"backbone": cfg.backbone, "emb_dim": cfg.emb_dim, "image_size": cfg.image_size,
                    "trainable_blocks": int(cfg.extra.get("trainable_blocks", 1))}
        if cfg.backbone == "none":  # the pixel autoencoder
            return {"image_size": cfg.image_size, "bottleneck": int(cfg.extra.get("bottleneck", 128)),
                    "grid": int(cfg.extra.get("grid", 2)), "loss": "mse", "trunk": "none"}
        if cfg.backbone not in models.AE_TRUNKS:
            raise CbirError(f"autoencoder --backbone must be one of {', '.join(models.AE_TRUNKS)}")
        return {"image_size": cfg.image_size, "bottleneck": int(cfg.extra.get("bottleneck", 256)),
                "grid": int(cfg.extra.get("grid", 1)), "loss": "mse", "trunk": cfg.backbone}

    @property
    def metric_name(self) -> str:
        if self.cfg.kind == "autoencoder":
            return "-mse"
        return "P@10" if self.has_labels else "view-recall@1"

    def _batches(self, epoch: int):
        """Index batches of (image, view) pairs: P classes x K images with labels, else 2 views per image."""
        cfg = self.cfg
        rng = np.random.default_rng(cfg.seed * 1000 + epoch)
        train_idx = np.flatnonzero(self.is_train)
        steps = max(1, len(train_idx) // cfg.batch_size)
        for _ in range(steps):
            if self.cfg.kind == "siamese" and self.has_labels:
                classes = np.unique(self.labels[train_idx])
                per = max(2, cfg.batch_size // len(classes))
                chosen = []
                for c in rng.permutation(classes)[: max(2, cfg.batch_size // per)]:
                    members = train_idx[self.labels[train_idx] == c]
                    chosen.extend(rng.choice(members, size=min(per, len(members)), replace=False))
                imgs = np.array(chosen)
                views = rng.integers(0, cfg.views, len(imgs))
            elif self.cfg.kind == "siamese":
                half = rng.choice(train_idx, size=min(cfg.batch_size // 2, len(train_idx)), replace=False)
                imgs = np.concatenate([half, half])
                v1 = rng.integers(0, cfg.views, len(half))
                v2 = (v1 + rng.integers(1, max(2, cfg.views), len(half))) % cfg.views
                views = np.concatenate([v1, v2])
            else:
                imgs = rng.choice(train_idx, size=min(cfg.batch_size, len(train_idx)), replace=False)
                views = rng.integers(0, cfg.views, len(imgs))
            yield imgs, views

    def train_epoch(self, net: nn.Module, opt: torch.optim.Optimizer, epoch: int) -> tuple[float, float]:
        from tqdm import tqdm

        net.train()
        if self.cfg.kind == "siamese":
            net.trunk.eval()
            for m in net.tail.modules():  # small batches: keep the pretrained batch-norm statistics
                if isinstance(m, nn.BatchNorm2d) and self.cfg.backbone != "seed-cnn":
                    m.eval()
        losses, seen, t0 = [], 0, time.perf_counter()
        batches = list(self._batches(epoch))
        bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", disable=not self.cfg.progress, file=sys.stderr,
                   leave=False)
        for imgs, views in bar:
            x = self.cached[torch.from_numpy(imgs), torch.from_numpy(views)].to(self.device).float()
            if self.cfg.kind == "siamese":
                emb = net.from_trunk(x)
                loss = contrastive_loss(emb, torch.from_numpy(self.labels[imgs]).to(self.device), self.cfg.margin)
            else:
                loss = net.loss(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            seen += len(imgs)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        return float(np.mean(losses)), seen / (time.perf_counter() - t0)

    @torch.inference_mode()
    def embed_view(self, net: nn.Module, idx: np.ndarray, view: int) -> np.ndarray:
        net.eval()
        out = []
        for i in range(0, len(idx), 128):
            x = self.cached[torch.from_numpy(idx[i:i + 128]), view].to(self.device).float()
            e = net.from_trunk(x) if self.cfg.kind == "siamese" else net.embed(x)
            out.append(F.normalize(e.float(), dim=1).cpu().numpy())
        return np.concatenate(out)

    @torch.inference_mode()
    def validate(self, net: nn.Module) -> float:
        val_idx = np.flatnonzero(self.is_val)
        if self.cfg.kind == "autoencoder":
            net.eval()
            errs = []
            for i in range(0, len(val_idx), 64):
                x = self.cached[torch.from_numpy(val_idx[i:i + 64]), 0].to(self.device).float()
                errs.append(float(net.loss(x)) * len(x))
            return -sum(errs) / len(val_idx)
        gallery_idx = np.flatnonzero(self.is_train | self.is_val)
        gallery = self.embed_view(net, gallery_idx, 0)
        pos = {int(g): n for n, g in enumerate(gallery_idx)}
        q_in_g = np.array([pos[int(i)] for i in val_idx])
        if self.has_labels:
            return precision_at_k(gallery[q_in_g], gallery, self.labels[val_idx], self.labels[gallery_idx], q_in_g)
        views = self.embed_view(net, val_idx, min(1, self.cfg.views - 1))
        top1 = np.argmax(views @ gallery.T, axis=1)
        return float((top1 == q_in_g).mean())

    # ---------------------------------------------------------------------------------------------
    def _save_model(self, net, arch, pre, coll, history, baseline, best, best_epoch, started) -> None:
        ckpt = {
            "format": "cbir-model-1",
            "kind": self.cfg.kind,
            "arch": arch,
            "preprocess": pre.to_dict(),
            "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
            "training": {
                "data_root": str(Path(coll.root).resolve()),
                "fingerprint": coll.fingerprint,
                "images": len(coll.files),
                "labels": "none" if coll.labels is None else self.cfg.labels,
                "split": list(self.cfg.split),
                "seed": self.cfg.seed,
                "metric": self.metric_name,
                "baseline_val": float(baseline),
                "best_val": float(best),
                "best_epoch": int(best_epoch),
                "history": history,
                "seconds": time.perf_counter() - started,
                "versions": library_versions(),
            },
        }
        tmp = Path(f"{self.out}.tmp-{os.getpid()}")
        torch.save(ckpt, tmp)
        os.replace(tmp, self.out)

    def _save_last(self, net, opt, sched, history, best, best_epoch, epoch, baseline) -> None:
        tmp = Path(f"{self.last_path}.tmp-{os.getpid()}")
        torch.save({"state_dict": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "history": history, "best": best, "best_epoch": best_epoch, "epoch": epoch,
                    "baseline": baseline}, tmp)
        os.replace(tmp, self.last_path)

    def _plot(self, history: list[dict[str, float]]) -> None:
        if not history:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
        ep = [h["epoch"] for h in history]
        ax[0].plot(ep, [h["loss"] for h in history], marker="o")
        ax[0].set(title="training loss", xlabel="epoch")
        ax[1].plot(ep, [h["val"] for h in history], marker="o", color="tab:green")
        ax[1].set(title=f"validation {self.metric_name}", xlabel="epoch")
        fig.tight_layout()
        fig.savefig(self.out.with_suffix(".loss.png"), dpi=90)
        plt.close(fig)
