"""The PyTorch "Transfer learning for computer vision" tutorial recipe, as a command.

The reference `finetune train` is benchmarked against. It stays faithful to the tutorial, flaws
included (batch 4, loaders whose workers are re-spawned every epoch, BatchNorm statistics of the
frozen backbone still updating in feature-extract mode), because the point is to compare with what
people copy from it.

    python benchmarks/tutorial_baseline.py DATA --mode finetune --weights resnet18.pth --out best.pt
    python benchmarks/tutorial_baseline.py DATA --model mobilenet_v2 --weights mobilenet_v2.pth --json r.json

Each epoch's row in --json records `elapsed`: seconds since this script started, so the time at which the
recipe first reached an accuracy can be read off (benchmarks/time_to_accuracy.py).
"""
import time

T0 = time.time()  # before the heavy imports, so "seconds" covers start-up like an end-to-end timing

import argparse
import copy
import json
import os
import random
import sys

import numpy as np
import torch
import torch.nn as nn
from torch.optim import lr_scheduler
from torchvision import datasets, models, transforms

# ImageNet statistics, which the pretrained backbone expects.
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="folder with train/ and val/ class folders")
    p.add_argument("--mode", choices=["finetune", "feature-extract"], default="finetune")
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="resnet18", help="a torchvision model name (its head is the last Linear)")
    p.add_argument("--weights", default="none", help="a torchvision state_dict file for --model, or none (random)")
    p.add_argument("--out", default="best.pt", help="where the best model's state_dict is saved")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--json", help="write results here")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)

    data_transforms = {
        "train": transforms.Compose([
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]),
        "val": transforms.Compose([
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]),
    }
    image_datasets = {x: datasets.ImageFolder(os.path.join(args.data, x), data_transforms[x]) for x in ["train", "val"]}
    # Built once, as in the tutorial: without persistent_workers every epoch re-spawns the workers.
    dataloaders = {x: torch.utils.data.DataLoader(image_datasets[x], batch_size=4, shuffle=x == "train",
                                                  num_workers=args.workers) for x in ["train", "val"]}
    dataset_sizes = {x: len(image_datasets[x]) for x in ["train", "val"]}
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")

    model = models.get_model(args.model)
    if args.weights != "none":
        model.load_state_dict(torch.load(args.weights, weights_only=True))
    if args.mode == "feature-extract":
        for param in model.parameters():
            param.requires_grad = False
    # Created after freezing, so the new head is the only trainable part in feature-extract mode. The tutorial
    # replaces resnet18's fc; for other models the same: their last Linear.
    head_name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent, _, child = head_name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    setattr(owner, child, nn.Linear(getattr(owner, child).in_features, len(image_datasets["train"].classes)))
    head = model.get_submodule(head_name)
    model = model.to(device)
    trained = model.parameters() if args.mode == "finetune" else head.parameters()
    optimizer = torch.optim.SGD(trained, lr=0.001, momentum=0.9)
    scheduler = lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    criterion = nn.CrossEntropyLoss()

    best_model_wts = copy.deepcopy(model.state_dict())
    best_acc = 0.0
    history = []
    for epoch in range(args.epochs):
        row = {"epoch": epoch + 1}
        for phase in ["train", "val"]:
            # As in the tutorial, train() reaches the frozen backbone too: its BN running stats keep moving.
            if phase == "train":
                model.train()
            else:
                model.eval()
            running_loss, running_corrects = 0.0, 0
            for inputs, labels in dataloaders[phase]:
                inputs, labels = inputs.to(device), labels.to(device)
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(inputs)
                    _, preds = torch.max(outputs, 1)
                    loss = criterion(outputs, labels)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
                running_loss += loss.item() * inputs.size(0)
                running_corrects += torch.sum(preds == labels.data).item()
            if phase == "train":
                scheduler.step()
            row[f"{phase}_loss"] = running_loss / dataset_sizes[phase]
            row[f"{phase}_acc"] = running_corrects / dataset_sizes[phase]
        row["elapsed"] = time.time() - T0
        if row["val_acc"] > best_acc:
            best_acc = row["val_acc"]
            best_model_wts = copy.deepcopy(model.state_dict())
        history.append(row)
        print(f"epoch {epoch + 1}/{args.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
              f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}  ({time.time() - T0:.0f}s)", file=sys.stderr)

    torch.save(best_model_wts, args.out)
    seconds = time.time() - T0
    print(f"best val acc {best_acc:.4f}, {seconds:.0f}s", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"best_val_acc": best_acc, "epochs": args.epochs, "seconds": seconds, "history": history}, f,
                      indent=2)


if __name__ == "__main__":  # workers re-import this file where processes are spawned (macOS, Windows)
    main()
