"""The training loop: data, model, optimiser, schedule, AMP, metrics, best-model saving, NaN guard, events."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune import data as D
from finetune import models as M
from finetune.checkpoint import save_model_file, write_text_atomic
from finetune.config import TrainConfig
from finetune.devices import resolve_device
from finetune.errors import DivergedError, FinetuneError, ResourceError

Emit = Callable[..., None]  # emit(event_name, **fields): the CLI renders, the library never prints

RUNS_ROOT = Path("runs")
LATEST_POINTER = RUNS_ROOT / "latest.json"
CACHE_BUDGET_BYTES = 4 * 1024**3  # decoded images kept in RAM up to this; beyond it, stream from disk
METRIC_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("step", "plateau", "cosine", "none")
MODES = ("finetune", "feature-extract")


@dataclass
class RunResult:
    run_dir: Path
    model_path: Path
    best_epoch: int
    best_val_acc: float
    best_val_loss: float
    history: list[dict]
    seconds: float
    classes: list[str]
    device: str


def validate(cfg: TrainConfig) -> None:
    """Reject bad options before any work (exit 2)."""

    def bad(msg: str):
        raise FinetuneError(msg, exit_code=2)

    if cfg.epochs < 1:
        bad(f"--epochs {cfg.epochs}: must be at least 1")
    if cfg.batch_size < 1:
        bad(f"--batch-size {cfg.batch_size}: must be at least 1")
    if cfg.lr is not None and not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        bad(f"--lr {cfg.lr}: must be a positive number, e.g. 0.001")
    if cfg.weight_decay < 0:
        bad(f"--weight-decay {cfg.weight_decay}: must be 0 or more")
    if not 0 <= cfg.dropout < 1:
        bad(f"--dropout {cfg.dropout}: must be in [0, 1)")
    if not 0 < cfg.val_fraction < 1:
        bad(f"--val-fraction {cfg.val_fraction}: must be between 0 and 1, e.g. 0.2")
    for value, choices, opt in ((cfg.optimizer, OPTIMIZERS, "--optimizer"), (cfg.scheduler, SCHEDULERS, "--scheduler"),
                                (cfg.mode, MODES, "--mode"), (cfg.augment, D.AUGMENTATIONS, "--augment")):
        if value not in choices:
            bad(f"{opt} {value}: choose one of {', '.join(choices)}")
    M.check_model_name(cfg.model)


def new_run_dir(cfg: TrainConfig) -> Path:
    """runs/<timestamp>-<model>, or --output as given."""
    if cfg.output:
        return Path(cfg.output)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = RUNS_ROOT / f"{stamp}-{cfg.model}"
    path, n = base, 2
    while path.exists():
        path, n = Path(f"{base}-{n}"), n + 1
    return path


def latest_model() -> Path:
    """The best model of the latest run, from runs/latest.json."""
    if not LATEST_POINTER.is_file():
        raise FinetuneError(f"no --model given and no {LATEST_POINTER} here; train first (`finetune train DATA`) "
                            "or pass --model PATH", exit_code=2)
    try:
        return Path(json.loads(LATEST_POINTER.read_text())["model"])
    except (ValueError, KeyError):
        raise FinetuneError(f"{LATEST_POINTER}: unreadable; pass --model PATH") from None


def _make_optimizer(cfg: TrainConfig, params):
    import torch

    lr = cfg.base_lr()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def _make_scheduler(cfg: TrainConfig, optimizer):
    import torch

    s = torch.optim.lr_scheduler
    if cfg.scheduler == "step":
        return s.StepLR(optimizer, step_size=max(1, round(cfg.epochs * 0.3)), gamma=0.1)
    if cfg.scheduler == "plateau":
        return s.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=2)
    if cfg.scheduler == "cosine":
        return s.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return None


def _loader(dataset, batch_size: int, shuffle: bool, workers: int, device, seed: int):
    import torch

    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=g,
        persistent_workers=workers > 0,  # no per-epoch worker start-up
        pin_memory=device.type == "cuda", drop_last=False,
    )


def evaluate(model, loader, device, criterion, autocast, memory_format=None) -> tuple[float, float]:
    """(mean loss, accuracy) over a loader, under inference_mode."""
    import torch

    model.eval()
    total, loss_sum, correct = 0, 0.0, 0
    with torch.inference_mode():
        for x, y in loader:
            x, y = _to_device(x, y, device, memory_format)
            with autocast():
                logits = model(x)
            loss_sum += criterion(logits.float(), y).item() * y.numel()
            correct += (logits.argmax(1) == y).sum().item()
            total += y.numel()
    return loss_sum / max(total, 1), correct / max(total, 1)


def _to_device(x, y, device, memory_format):
    x = x.to(device, non_blocking=True)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    return x, y.to(device, non_blocking=True)


def run_training(cfg: TrainConfig, emit: Emit = lambda *a, **k: None) -> RunResult:
    """Train cfg.model on cfg.data; write the run folder; return where the best model is."""
    import contextlib

    import torch

    t_start = time.perf_counter()
    validate(cfg)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    split = D.find_dataset(cfg.data, cfg.val_fraction, cfg.seed)
    choice = M.resolve_weights(cfg.model, cfg.weights)
    pre = choice.preprocessing
    emit("dataset", split=split, device=str(device), weights=choice.label)

    state = M.load_pretrained_state(choice)
    model, head = M.build_model(cfg.model, len(split.classes), cfg.dropout, state)
    frozen = cfg.mode == "feature-extract"
    if frozen:
        M.freeze_backbone(model, head)

    # Decode every image once at the size the transforms need, when it fits the memory budget.
    workers = D.default_workers() if cfg.workers < 0 else cfg.workers
    short_side = pre["resize_size"]
    paths = [s.path for s in split.train + split.val]
    cache = None
    if D.estimate_cache_bytes(len(paths), short_side) <= CACHE_BUDGET_BYTES:
        emit("decode_start", total=len(paths))
        cache, failed = D.decode_all(paths, short_side, max(1, workers), lambda n: emit("decode_advance", n=n))
        if failed:
            bad = {p for p, _ in failed}
            split.skipped.extend(failed)
            split.train = [s for s in split.train if s.path not in bad]
            split.val = [s for s in split.val if s.path not in bad]
            emit("skipped", files=failed, root=split.root)
        loader_workers = 0  # decoded tensors are in this process; transforms on them are cheap
    else:
        loader_workers = workers
    if not split.train or not split.val:
        raise FinetuneError(f"{split.root}: no readable images left in {'train' if not split.train else 'val'}",
                            exit_code=3)

    train_ds = D.ImageDataset(split.train, D.train_transform(pre, cfg.augment), short_side, cache)
    val_ds = D.ImageDataset(split.val, D.eval_transform(pre), short_side, cache)
    train_loader = _loader(train_ds, cfg.batch_size, True, loader_workers, device, cfg.seed)
    val_loader = _loader(val_ds, cfg.batch_size, False, loader_workers, device, cfg.seed)

    on_cuda = device.type == "cuda"
    memory_format = torch.channels_last if (on_cuda and cfg.channels_last) else None
    model = model.to(device, memory_format=memory_format or torch.preserve_format)
    if on_cuda:
        torch.backends.cudnn.benchmark = True
    amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if on_cuda and cfg.amp else None
    autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _make_optimizer(cfg, params)
    scheduler = _make_scheduler(cfg, optimizer)
    criterion = torch.nn.CrossEntropyLoss()

    run_dir = new_run_dir(cfg)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ResourceError(f"{run_dir}: cannot create the run folder ({e.strerror}); choose another with -o") \
            from None
    prune_stale_temp_files(run_dir)
    model_path = run_dir / "best.pt"
    config = cfg.to_dict() | {"lr_used": cfg.base_lr(), "classes": split.classes, "layout": split.layout,
                              "train_images": len(split.train), "val_images": len(split.val),
                              "device": str(device), "base_weights": choice.label, "preprocessing": pre}
    write_text_atomic(run_dir / "config.json", json.dumps(config, indent=2))
    emit("start", run_dir=run_dir, epochs=cfg.epochs, batches=len(train_loader), lr=cfg.base_lr())

    history: list[dict] = []
    best = {"epoch": 0, "val_acc": -1.0, "val_loss": math.inf}
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        M.set_train_mode(model, head, frozen)
        seen, loss_sum, correct = 0, 0.0, 0
        emit("epoch_start", epoch=epoch)
        for step, (x, y) in enumerate(train_loader, 1):
            x, y = _to_device(x, y, device, memory_format)
            with autocast():
                logits = model(x)
                loss = criterion(logits.float(), y)
            if not torch.isfinite(loss):
                lr_now = optimizer.param_groups[0]["lr"]
                raise DivergedError(
                    f"training diverged: loss is {loss.item()} at epoch {epoch}, step {step} (lr {lr_now:.3g}); "
                    f"the learning rate is too high, try --lr {lr_now / 10:.3g}"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            n = y.numel()
            seen += n
            loss_sum += loss.item() * n
            correct += (logits.argmax(1) == y).sum().item()
            emit("batch", step=step, loss=loss.item())
        val_loss, val_acc = evaluate(model, val_loader, device, criterion, autocast, memory_format)
        lr_used = optimizer.param_groups[0]["lr"]
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val_acc)
        elif scheduler is not None:
            scheduler.step()
        row = {"epoch": epoch, "train_loss": loss_sum / seen, "train_acc": correct / seen, "val_loss": val_loss,
               "val_acc": val_acc, "lr": lr_used, "seconds": time.perf_counter() - t0}
        history.append(row)
        improved = val_acc > best["val_acc"] or (val_acc == best["val_acc"] and val_loss < best["val_loss"])
        if improved:
            best = {"epoch": epoch, "val_acc": val_acc, "val_loss": val_loss}
            save_model_file(
                model_path, arch=cfg.model, head=head, dropout=cfg.dropout,
                state_dict=M.plain_state_dict(model, head), classes=split.classes, base_weights=choice.label,
                preprocessing=pre, metrics={"best_epoch": epoch, "val_acc": val_acc, "val_loss": val_loss,
                                            "train_acc": row["train_acc"], "train_loss": row["train_loss"]},
                config=config,
            )
            _point_latest(run_dir, model_path)
        _write_metrics(run_dir, history)
        emit("epoch_end", row=row, improved=improved)

    seconds = time.perf_counter() - t_start
    result = RunResult(run_dir=run_dir, model_path=model_path, best_epoch=best["epoch"], best_val_acc=best["val_acc"],
                       best_val_loss=best["val_loss"], history=history, seconds=seconds, classes=split.classes,
                       device=str(device))
    summary = {"best_epoch": result.best_epoch, "best_val_acc": result.best_val_acc,
               "best_val_loss": result.best_val_loss, "seconds": seconds, "model": str(model_path),
               "skipped": [{"path": p, "reason": r} for p, r in split.skipped]}
    write_text_atomic(run_dir / "results.json", json.dumps(summary, indent=2))
    return result


def _point_latest(run_dir: Path, model_path: Path) -> None:
    write_text_atomic(LATEST_POINTER, json.dumps({"run_dir": str(run_dir.resolve()),
                                                  "model": str(model_path.resolve())}, indent=2))


def _write_metrics(run_dir: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    write_text_atomic(run_dir / "metrics.csv", buf.getvalue())


def prune_stale_temp_files(folder: str | os.PathLike) -> None:
    """Remove temp files a killed run left behind."""
    from finetune.checkpoint import TEMP_PREFIX

    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(TEMP_PREFIX + "*"):
            p.unlink(missing_ok=True)
