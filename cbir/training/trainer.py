"""`cbir train`: split, cache views, train, validate every epoch, keep the best, stop early, resume.

What differs between kinds of model is their recipe (`_recipes.py`, one module per kind); this is the rest.
Files written beside MODEL.pt: MODEL.last.pt (resume state), MODEL.split.csv, MODEL.loss.png.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cbir.encoders._device import configure_threads, resolve_device
from cbir.encoders.base import Preprocess, library_versions
from cbir.errors import CbirError
from cbir.files import atomic_path
from cbir.training._recipes import Recipe, TrainConfig, Views, get_recipe
from cbir.training.data import Collection, cache_views, load_collection, stratified_split, write_split

log = logging.getLogger(__name__)


def _resolved(cfg: TrainConfig) -> tuple[TrainConfig, Recipe]:
    """A checked copy of `cfg` with the recipe's defaults filled in, and the recipe."""
    recipe = get_recipe(cfg.kind)
    cfg = dataclasses.replace(cfg, **{name: value for name, value in recipe.defaults(cfg).items()
                                      if getattr(cfg, name) is None})
    for name in ("epochs", "batch_size", "image_size", "views"):
        if getattr(cfg, name) < 1:
            raise CbirError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.batch_size < 4:
        raise CbirError("--batch-size must be at least 4 (pairs need company)")
    if abs(sum(cfg.split) - 1.0) > 1e-6 or min(cfg.split[:2]) <= 0:
        raise CbirError("--split must be three fractions (train,val,test) that add up to 1, train and val > 0")
    return cfg, recipe


@dataclass(kw_only=True)
class _State:
    """Where training stands: what resuming restores."""

    baseline: float
    best: float = -math.inf
    best_epoch: int = 0
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass(kw_only=True)
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
        self.cfg, self.recipe = _resolved(cfg)
        self.out = Path(self.cfg.out)
        self.last_path = self.out.with_suffix(".last.pt")
        self.device = resolve_device(self.cfg.device)
        configure_threads()
        torch.manual_seed(self.cfg.seed)
        random.seed(self.cfg.seed)

    # ---------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        started = time.perf_counter()
        coll, split = self._collection()
        arch = self.recipe.arch(cfg)
        net, pre, trainable = self._network(arch)
        self.views = self._cache(coll, split, pre, net.trunk)
        net.to(self.device)
        opt = torch.optim.AdamW([p for p in trainable.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=2)
        # resuming restores the baseline measured when the run began, so it is not measured again
        state = self._resume(net, opt, sched) if cfg.resume else _State(baseline=self.validate(net))
        log.info(f"{cfg.kind} ({arch.get('backbone', 'conv')}): {int(self.views.is_train.sum())} train / "
                 f"{int(self.views.is_val.sum())} val images; before training: val {self.metric_name} "
                 f"{state.baseline:.4f}")
        saved = _Saved(arch=arch, preprocess=pre, coll=coll, started=started)
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
        split = cfg.assignments or stratified_split(coll, cfg.split, cfg.seed)
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
        net, pre = self.recipe.build(arch, self.cfg.backbone_weights)
        for p in net.trunk.parameters():
            p.requires_grad_(False)
        return net, pre, net.trainable()

    def _cache(self, coll: Collection, split: list[str], pre: Preprocess, trunk: nn.Module) -> Views:
        """Run the frozen trunk once over every view of the train and val images."""
        use = np.array([s in ("train", "val") for s in split])
        files = [f for f, u in zip(coll.files, use, strict=True) if u]
        sub = Collection(root=coll.root, files=files, labels=[lab for lab, u in zip(coll.labels, use, strict=True)
                                                              if u] if coll.labels else None)
        sub_split = [s for s, u in zip(split, use, strict=True) if u]
        cached, ok = cache_views(sub, pre, trunk, views=self.cfg.views, seed=self.cfg.seed, device=self.device,
                                 progress=self.cfg.progress)
        is_train = np.array([s == "train" for s in sub_split]) & ok
        is_val = np.array([s == "val" for s in sub_split]) & ok
        if is_train.sum() < 2 or is_val.sum() < 1:
            raise CbirError("too few decodable images to train (need at least 2 for training and 1 to validate)")
        names = sorted(set(sub.labels)) if sub.labels else None
        labels = np.array([names.index(lab) for lab in sub.labels]) if names else np.arange(len(sub.files))
        return Views(cached=cached, is_train=is_train, is_val=is_val, labels=labels, has_labels=names is not None,
                     count=self.cfg.views, device=self.device)

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
        """A network whose recipe keeps its start (Siamese) and that never beat that start on validation is not
        kept: the model file then holds the untrained network (pretrained backbone), and the run says so plainly.
        Returns True then."""
        if not self.recipe.keeps_untrained_start or state.best > state.baseline:
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
    @property
    def metric_name(self) -> str:
        return self.recipe.metric_name(self.views.has_labels)

    def _batches(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The epoch's batches of (image, view) pairs, drawn by the recipe from a generator seeded per epoch."""
        rng = np.random.default_rng(self.cfg.seed * 1000 + epoch)
        train = np.flatnonzero(self.views.is_train)
        for _ in range(max(1, len(train) // self.cfg.batch_size)):
            yield self.recipe.batch(rng, train, self.views, self.cfg)

    def train_epoch(self, net: nn.Module, opt: torch.optim.Optimizer, epoch: int) -> tuple[float, float]:
        from tqdm import tqdm

        self.recipe.train_mode(net, self.cfg)
        losses, seen, t0 = [], 0, time.perf_counter()
        batches = list(self._batches(epoch))
        bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", disable=not self.cfg.progress, file=sys.stderr,
                   leave=False)
        for imgs, views in bar:
            labels = torch.from_numpy(self.views.labels[imgs]).to(self.device)
            loss = self.recipe.loss(net, self.views.take(imgs, views), labels, self.cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            seen += len(imgs)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        return float(np.mean(losses)), seen / (time.perf_counter() - t0)

    def validate(self, net: nn.Module) -> float:
        return self.recipe.validate(net, self.views)

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
            torch.save(ckpt, tmp)

    def _save_last(self, net: nn.Module, opt: torch.optim.Optimizer, sched: Any, state: _State) -> None:
        with atomic_path(self.last_path) as tmp:
            torch.save({"state_dict": net.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "history": state.history, "best": state.best,
                        "best_epoch": state.best_epoch, "epoch": state.epoch, "baseline": state.baseline}, tmp)

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
