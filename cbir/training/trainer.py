"""`cbir train`: split, cache views, train, validate every epoch, keep the best, stop early, resume.

Files written beside MODEL.pt: MODEL.last.pt (resume state), MODEL.split.csv, MODEL.loss.png.
"""

from __future__ import annotations

import logging
import math
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

from cbir import metrics
from cbir.encoders import _trainable as models
from cbir.encoders._device import configure_threads, resolve_device
from cbir.encoders.base import Preprocess, library_versions
from cbir.errors import CbirError
from cbir.files import atomic_path, write_in_one_go
from cbir.training.data import Collection, cache_views, load_collection, stratified_split, write_split

log = logging.getLogger(__name__)


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
    ranking = metrics.rank(queries, gallery, q_index_in_gallery, depth=k)
    return float(metrics.precision_at(metrics.relevance(ranking, q_labels, g_labels), k).mean())


@dataclass
class _State:
    """Where training stands: what resuming restores."""

    baseline: float
    best: float = -math.inf
    best_epoch: int = 0
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class _Saved:
    """What every saved model records besides its weights."""

    arch: dict[str, Any]
    preprocess: Preprocess
    coll: Collection
    started: float


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
        coll, split = self._collection()
        arch = self._arch()
        net, pre, trainable = self._network(arch)
        self._cache(coll, split, pre, net.trunk)
        net.to(self.device)
        opt = torch.optim.AdamW([p for p in trainable.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=2)
        state = _State(baseline=self.validate(net))
        if cfg.resume:
            state = self._resume(net, opt, sched)
        log.info(f"{cfg.kind} ({arch.get('backbone', 'conv')}): {int(self.is_train.sum())} train / "
                 f"{int(self.is_val.sum())} val images; before training: val {self.metric_name} {state.baseline:.4f}")
        saved = _Saved(arch, pre, coll, started)
        interrupted = kept_start = False
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _interrupt)
        start = {k: v.detach().clone() for k, v in net.state_dict().items()}  # the untrained encoder
        try:
            self._epochs(net, opt, sched, state, saved)
            kept_start = self._keep_better(net, start, saved, state)
        except KeyboardInterrupt:
            interrupted = True
            log.warning(f"\ninterrupted in epoch {state.epoch}; {self.out} holds the best model so far "
                        f"(cbir train ... --resume continues)")
            if state.best == -math.inf:
                self._save_model(net, saved, _State(baseline=state.baseline, best=state.baseline,
                                                    history=state.history))
        finally:
            signal.signal(signal.SIGTERM, previous)
        self._plot(state.history)
        return {"best_val": state.best, "best_epoch": state.best_epoch, "baseline_val": state.baseline,
                "kept_untrained": not interrupted and kept_start,
                "metric": self.metric_name, "epochs_run": len(state.history),
                "seconds": time.perf_counter() - started, "interrupted": interrupted, "out": str(self.out)}

    def _collection(self) -> tuple[Collection, list[str]]:
        cfg = self.cfg
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
        return coll, split

    def _network(self, arch: dict[str, Any]) -> tuple[nn.Module, Preprocess, nn.Module]:
        pretrained = self.cfg.extra.get("backbone_weights", "imagenet")
        build = models.build_siamese if self.cfg.kind == "siamese" else models.build_autoencoder
        net, pre = build(arch, pretrained=pretrained)
        for p in net.trunk.parameters():
            p.requires_grad_(False)
        return net, pre, net.trainable()

    def _cache(self, coll: Collection, split: list[str], pre: Preprocess, trunk: nn.Module) -> None:
        """Run the frozen trunk once over every view of the train and val images; sets the masks and labels."""
        use = np.array([s in ("train", "val") for s in split])
        files = [f for f, u in zip(coll.files, use, strict=True) if u]
        sub = Collection(coll.root, files, [lab for lab, u in zip(coll.labels, use, strict=True) if u]
                         if coll.labels else None)
        sub_split = [s for s, u in zip(split, use, strict=True) if u]
        self.cached, ok = cache_views(sub, pre, trunk, views=self.cfg.views, seed=self.cfg.seed, device=self.device,
                                      progress=self.cfg.progress)
        self.is_train = np.array([s == "train" for s in sub_split]) & ok
        self.is_val = np.array([s == "val" for s in sub_split]) & ok
        if self.is_train.sum() < 2 or self.is_val.sum() < 1:
            raise CbirError("too few decodable images to train (need at least 2 for training and 1 to validate)")
        names = sorted(set(sub.labels)) if sub.labels else None
        self.labels = (np.array([names.index(lab) for lab in sub.labels]) if names
                       else np.arange(len(sub.files)))
        self.has_labels = names is not None

    def _resume(self, net: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> _State:
        saved = torch.load(self.last_path, map_location="cpu", weights_only=True)
        net.load_state_dict(saved["state_dict"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        state = _State(baseline=saved["baseline"], best=saved["best"], best_epoch=saved["best_epoch"],
                       epoch=saved["epoch"], history=saved["history"])
        log.info(f"resuming after epoch {state.epoch} (best {state.best:.4f} at epoch {state.best_epoch})")
        return state

    def _epochs(self, net: nn.Module, opt: torch.optim.Optimizer, sched: Any, state: _State, saved: _Saved) -> None:
        cfg = self.cfg
        for epoch in range(state.epoch + 1, cfg.epochs + 1):
            state.epoch = epoch
            loss, ips = self.train_epoch(net, opt, epoch)
            score = self.validate(net)
            sched.step(score)
            state.history.append({"epoch": epoch, "loss": loss, "val": score, "images_per_s": ips,
                                  "lr": opt.param_groups[0]["lr"]})
            improved = score > state.best
            if improved:
                state.best, state.best_epoch = score, epoch
                self._save_model(net, saved, state)
            self._save_last(net, opt, sched, state)
            log.info(f"epoch {epoch:>3}/{cfg.epochs}  loss {loss:.4f}  val {self.metric_name} {score:.4f}"
                     f"{'  (best)' if improved else ''}  {ips:.0f} img/s")
            if epoch - state.best_epoch >= cfg.patience:
                log.info(f"early stop: no better val {self.metric_name} for {cfg.patience} epochs")
                break

    def _keep_better(self, net: nn.Module, start: dict[str, torch.Tensor], saved: _Saved, state: _State) -> bool:
        """A Siamese network that never beat its untrained starting point on validation is not kept: the model file
        then holds the untrained network (pretrained backbone), and the run says so plainly. Returns True then."""
        if self.cfg.kind != "siamese" or state.best > state.baseline:
            return False
        net.load_state_dict(start)
        self._save_model(net, saved, _State(baseline=state.baseline, best=state.baseline, history=state.history))
        log.warning(f"training did not improve on the untrained encoder (best val {self.metric_name} "
                    f"{state.best:.4f} against {state.baseline:.4f} before training): {self.out} holds the untrained "
                    f"network instead, as good as its starting point; indexing with {self.cfg.backbone} directly is "
                    "the same without a model file")
        state.best, state.best_epoch = state.baseline, 0
        return True

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
    def _save_model(self, net: nn.Module, saved: _Saved, state: _State) -> None:
        coll = saved.coll
        ckpt = {
            "format": "cbir-model-1",
            "kind": self.cfg.kind,
            "arch": saved.arch,
            "preprocess": saved.preprocess.to_dict(),
            "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
            "training": {
                "data_root": str(Path(coll.root).resolve()),
                "fingerprint": coll.fingerprint,
                "images": len(coll.files),
                "labels": "none" if coll.labels is None else self.cfg.labels,
                "split": list(self.cfg.split),
                "seed": self.cfg.seed,
                "metric": self.metric_name,
                "baseline_val": float(state.baseline),
                "best_val": float(state.best),
                "best_epoch": int(state.best_epoch),
                "history": state.history,
                "seconds": time.perf_counter() - saved.started,
                "versions": library_versions(),
            },
        }
        with atomic_path(self.out) as tmp:
            write_in_one_go(tmp, lambda f: torch.save(ckpt, f))

    def _save_last(self, net: nn.Module, opt: torch.optim.Optimizer, sched: Any, state: _State) -> None:
        last = {"state_dict": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "history": state.history, "best": state.best, "best_epoch": state.best_epoch, "epoch": state.epoch,
                "baseline": state.baseline}
        with atomic_path(self.last_path) as tmp:
            write_in_one_go(tmp, lambda f: torch.save(last, f))

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
