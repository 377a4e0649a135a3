"""Every command-line option, declared once, its default and choices read from finetune.config; commands
that share an option (train, lr-find, tune) share its declaration.

A training setting is declared twice in all: in TrainConfig (its default and why) and in SETTINGS below (its option
and help). Commands take them with @settings(...): their signatures are built from this table, never written out.
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Annotated

import typer

from finetune.config import (
    AUGMENTATIONS,
    BALANCE,
    DEVICES,
    LR_PER_IMAGE,
    MODES,
    OPTIMIZERS,
    SCHEDULERS,
    TRACKERS,
    defaults,
)
from finetune.formats.load import RUNTIMES

D = defaults()
DATA, MODEL, OPTIM, CHECKS, OUTPUT, PERF = "Data", "Model", "Optimisation", "Checks", "Output", "Performance"


def one_of(choices) -> str:
    return ", ".join(choices)


Data = Annotated[str, typer.Argument(metavar="DATA", show_default=False, help=(
    "Folder of class folders (DATA/<class>/*.jpg), or with train/ and val/ (or valid/, validation/) inside; or a "
    "label file (.csv, .tsv, .jsonl: an image path and its label(s) per row)."))]
OptionalData = Annotated[str | None, typer.Argument(metavar="DATA", show_default=False, help=(
    "Folder of class folders (DATA/<class>/*.jpg), or with train/ and val/ (or valid/, validation/) inside; or a "
    "label file (.csv, .tsv, .jsonl: an image path and its label(s) per row). Not needed with --resume, nor with a "
    "--config file that names it."))]
Model = Annotated[str, typer.Option("--model", "-m", metavar="NAME", rich_help_panel=MODEL, help=(
    "Any torchvision classification model: resnet18, resnet50, wide_resnet50_2, resnext50_32x4d, alexnet, "
    "mobilenet_v2, ...; or timm:NAME for any timm model, e.g. timm:convnext_tiny.fb_in1k (the timm extra)."))]
Weights = Annotated[str, typer.Option(metavar="WEIGHTS", rich_help_panel=MODEL, help=(
    "DEFAULT (ImageNet, downloaded once; timm: from the Hugging Face cache), an enum name such as IMAGENET1K_V2, "
    "none (random init), or a path to a state_dict file."))]
InitFrom = Annotated[str | None, typer.Option(metavar="MODEL", rich_help_panel=MODEL, help=(
    "Start from a finetune model file (best.pt): its architecture, weights and preprocessing; its head is kept "
    "when the classes are the same, else replaced. --model and --weights then do not apply."))]
Mode = Annotated[str, typer.Option(metavar="MODE", rich_help_panel=MODEL, help=(
    f"{one_of(MODES)}. finetune: every layer trains; feature-extract: the backbone stays frozen and only the "
    "head is fitted; auto: finetune on a GPU; on a CPU a converged linear probe (seconds), then fine-tuning "
    "from it when --time-budget or an option only training uses (--epochs, --lr, -b, ...) is given."))]
Solver = Annotated[str, typer.Option(metavar="NAME", rich_help_panel=MODEL, help=(
    "feature-extract's head: lbfgs = a converged linear probe in seconds (L2 chosen by cross-validation on the "
    "training images; --epochs and --lr do not apply), sgd = --epochs of SGD on the head."))]
Dropout = Annotated[float, typer.Option(metavar="P", rich_help_panel=MODEL, help="Dropout before the new head "
                                        "(0 = none).")]
FreezeEpochs = Annotated[int, typer.Option(metavar="N", rich_help_panel=MODEL, help=(
    "Train only the head for this many epochs, then unfreeze the backbone."))]
BackboneLrMult = Annotated[float | None, typer.Option(metavar="X", rich_help_panel=MODEL, help=(
    "Backbone learning rate = --lr x this. Default: 0.1 with --freeze-epochs, else 1."))]

Epochs = Annotated[int, typer.Option(metavar="N", rich_help_panel=OPTIM, help=(
    "Passes over the training images (of fine-tuning, after a probe; a probe alone is fitted once). With "
    "--time-budget: at most this many (by default the budget alone decides)."))]
TimeBudget = Annotated[str | None, typer.Option(metavar="TIME", rich_help_panel=OPTIM, help=(
    "Time for the whole run (90s, 10m, 1h): the fine-tuning epochs that fill it, planned from their measured "
    "time. With --mode auto on a CPU: a linear probe first, then fine-tuning from it in the time left."))]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", metavar="N", rich_help_panel=OPTIM,
                                        help="Images per step (per process with --gpus).")]
Lr = Annotated[float | None, typer.Option(metavar="LR", rich_help_panel=OPTIM, help=(
    f"Learning rate. Default: {4 * LR_PER_IMAGE['sgd']:g} per 4 images in a step for SGD ({32 * LR_PER_IMAGE['sgd']:g} "
    f"at -b 32), {32 * LR_PER_IMAGE['adamw']:g} per 32 images for AdamW."))]
Optimizer = Annotated[str, typer.Option(metavar="NAME", rich_help_panel=OPTIM, help=(
    f"{one_of(OPTIMIZERS)} (SGD with Nesterov momentum)."))]
Momentum = Annotated[float, typer.Option(metavar="M", rich_help_panel=OPTIM, help="SGD momentum.")]
WeightDecay = Annotated[float, typer.Option(metavar="WD", rich_help_panel=OPTIM, help="L2 weight decay.")]
Scheduler = Annotated[str, typer.Option(metavar="NAME", rich_help_panel=OPTIM, help=(
    f"Learning-rate schedule: {one_of(SCHEDULERS)}."))]
Augment = Annotated[str, typer.Option(metavar="NAME", rich_help_panel=OPTIM, help=(
    f"Training augmentation, {one_of(AUGMENTATIONS)}: auto = light for small photos (shorter side under the "
    "resize) and for fine-tuning from the probe, else standard; light = crop 35-100 % + flip; standard = crop "
    "8-100 %, flip, rotation up to 10 deg; trivial = crop 8-100 %, flip + TrivialAugmentWide; randaugment = crop 8-100 %, "
    "flip + RandAugment (2 ops, magnitude 9)."))]
Mixup = Annotated[float, typer.Option(metavar="ALPHA", rich_help_panel=OPTIM, help=(
    "MixUp: blend pairs of training images and their labels, weight ~ Beta(ALPHA, ALPHA), e.g. 0.2 (0 = off). "
    "With --cutmix, each batch gets one of the two."))]
Cutmix = Annotated[float, typer.Option(metavar="ALPHA", rich_help_panel=OPTIM, help=(
    "CutMix: paste a patch of another training image, labels mixed by area ~ Beta(ALPHA, ALPHA), e.g. 1.0 "
    "(0 = off)."))]
LabelSmoothing = Annotated[float, typer.Option(metavar="EPS", rich_help_panel=OPTIM, help=(
    "Label smoothing: this share of each target spread over all classes, e.g. 0.1 (0 = off)."))]
Erasing = Annotated[float, typer.Option(metavar="P", rich_help_panel=OPTIM, help=(
    "Random erasing: erase a random rectangle of a training view with this probability, e.g. 0.25 (0 = off)."))]
TrainSize = Annotated[int, typer.Option(metavar="PX", rich_help_panel=OPTIM, help=(
    "Training crop in pixels. 0 = automatic: 80 % of the eval crop in finetune mode (176 for 224), which matches "
    "the apparent object size of random crops and trains faster; else the eval crop."))]
Balance = Annotated[str, typer.Option(metavar="HOW", rich_help_panel=OPTIM, help=(
    f"Class imbalance, {one_of(BALANCE)}: rarer classes weigh more in the loss, or are drawn as often."))]
Patience = Annotated[int, typer.Option(metavar="N", rich_help_panel=OPTIM, help=(
    "Early stopping: stop after this many epochs without a better val accuracy (0 = off)."))]
Calibrate = Annotated[bool, typer.Option("--calibrate", rich_help_panel=OPTIM, help=(
    "After training, fit a softmax temperature on the val images so probabilities match accuracy; stored in "
    "the model."))]

ValFraction = Annotated[float, typer.Option(metavar="F", rich_help_panel=DATA, help=(
    "Share of each class held out for validation when DATA has no val/ folder (stratified)."))]
Seed = Annotated[int, typer.Option(metavar="N", rich_help_panel=DATA, help="Seed for the split, initialisation "
                                   "and shuffling.")]
Strict = Annotated[bool, typer.Option("--strict", rich_help_panel=DATA, help=(
    "Stop (exit 3) before training if any file cannot be used, instead of skipping it with a warning."))]
MaxPixels = Annotated[int, typer.Option(metavar="N", rich_help_panel=DATA, help=(
    "Refuse images with more pixels than this (decompression bombs), read from the header."))]
PathCol = Annotated[str | None, typer.Option(metavar="NAME", rich_help_panel=DATA, help=(
    "Label file: the column of image paths (relative to the file's folder or --image-dir, or absolute; an "
    "extension may be left out). Default: path, file, image or filename, else the column whose values name image "
    "files."))]
LabelCol = Annotated[str | None, typer.Option(metavar="NAME", rich_help_panel=DATA, help=(
    "Label file: the column of labels. Default: label, labels, class or tags (or the one column left besides the "
    "paths and a split)."))]
LabelSep = Annotated[str | None, typer.Option(metavar="SEP", rich_help_panel=DATA, help=(
    "Label file: what separates several labels in a cell (e.g. ';', '|', space). Default: ';' or '|' when a cell "
    "holds one; several labels make the dataset multi-label."))]
MultiLabel = Annotated[bool, typer.Option("--multi-label", rich_help_panel=DATA, help=(
    "Multi-label even when every row has one label: one sigmoid per class, each label decided on its own."))]
ImageDir = Annotated[str | None, typer.Option(metavar="FOLDER", rich_help_panel=DATA, help=(
    "Label file: the folder its relative paths start from. Default: the file's folder, or its one subfolder "
    "that holds the images (e.g. train/)."))]
Folds = Annotated[int, typer.Option(metavar="K", rich_help_panel=DATA, help=(
    "k-fold cross-validation: one model per stratified fold (train/ and val/ pooled); mean ± sd val accuracy. "
    "0 = off."))]
Fold = Annotated[int, typer.Option(metavar="N", rich_help_panel=DATA, help=(
    "With --folds K: train only fold N (1..K), e.g. to spread folds over machines. 0 = every fold."))]

Overfit = Annotated[int, typer.Option(metavar="N", rich_help_panel=CHECKS, help=(
    "Sanity check: train on N training images (e.g. 50) with no augmentation or regularisation; it should reach "
    "100 % on them."))]
Deterministic = Annotated[bool, typer.Option("--deterministic", rich_help_panel=CHECKS, help=(
    "Deterministic kernels: bit-for-bit repeatable runs (slower on GPU)."))]

Device = Annotated[str, typer.Option(metavar="DEVICE", rich_help_panel=PERF, help=(
    f"{one_of(DEVICES)}; auto = CUDA, then MPS, then CPU."))]
Workers = Annotated[int, typer.Option("--workers", "-j", metavar="N", rich_help_panel=PERF, help=(
    "Decoding threads / loader workers; -1 = automatic."))]
Amp = Annotated[bool, typer.Option(rich_help_panel=PERF, help=(
    "Mixed precision in training steps where the device computes it natively: bf16 (else fp16) on CUDA, bf16 on "
    "CPUs with AVX512-BF16/AMX. The run header says which."))]
ChannelsLast = Annotated[bool, typer.Option(rich_help_panel=PERF, help="channels_last memory format (faster "
                                            "convolutions on CUDA and CPU).")]
Compile = Annotated[bool, typer.Option("--compile", rich_help_panel=PERF, help=(
    "torch.compile the model for training steps: a compilation cost at start-up that only long runs can win "
    "back (not yet measured by finetune's benchmarks)."))]
Gpus = Annotated[int, typer.Option(metavar="N", rich_help_panel=PERF, help=(
    "Train on N GPUs of this machine (DistributedDataParallel through torchrun); -b is per GPU. With --device "
    "cpu: N CPU processes. Several machines: see docs/distributed.md."))]
SyncBn = Annotated[bool, typer.Option("--sync-bn", rich_help_panel=PERF, help=(
    "With several GPUs: BatchNorm statistics over all GPUs' images (SyncBatchNorm)."))]

Output = Annotated[str | None, typer.Option("--output", "-o", metavar="FOLDER", rich_help_panel=OUTPUT, help=(
    "Run folder. Default: runs/<date>-<time>-<model>. An existing folder must be empty (see --overwrite)."))]
Overwrite = Annotated[bool, typer.Option("--overwrite", rich_help_panel=OUTPUT, help=(
    "-o names a folder an earlier run wrote: remove that run's files first."))]
Resume = Annotated[str | None, typer.Option(metavar="RUN", rich_help_panel=OUTPUT, help=(
    "Continue a run folder from its last completed epoch, with that run's settings (a larger --epochs trains "
    "it further)."))]
Config = Annotated[str | None, typer.Option(metavar="FILE", rich_help_panel=OUTPUT, help=(
    "Settings from a .yaml, .toml or .json file (keys as the options' names, e.g. batch_size: 64; a best.json from "
    "`finetune tune`; a run folder's config.json repeats that run, DATA included); options typed override it."))]
Log = Annotated[str, typer.Option(metavar="TRACKER", rich_help_panel=OUTPUT, help=(
    f"Also record the run in {one_of(TRACKERS)} (comma-separated for both; none = off): tensorboard writes "
    "RUN/tensorboard/; mlflow logs to MLFLOW_TRACKING_URI, else ./mlflow.db with files under ./mlruns/. Each needs "
    "its extra: pip install 'finetune[tensorboard]' / 'finetune[mlflow]'."))]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", rich_help_panel=OUTPUT, help="No progress output.")]

# check --labels.
Labels = Annotated[bool, typer.Option("--labels", rich_help_panel=CHECKS, help=(
    "Also embed every image with a pretrained backbone (--model, --weights; computed once, cached) and rank likely "
    "label errors (K-fold linear heads + confident learning), near-duplicates and outliers. Needs "
    "finetune[labels]."))]
LabelFolds = Annotated[int, typer.Option(metavar="K", rich_help_panel=CHECKS, help=(
    "With --labels: heads fitted, each scoring the images it did not see."))]
Similarity = Annotated[float, typer.Option(metavar="COS", rich_help_panel=CHECKS, help=(
    "With --labels: cosine similarity of embeddings at which two photos are near-duplicates (measured for "
    "MobileNetV2 on re-encoded and resized copies; see docs/data.md)."))]
ReviewInto = Annotated[str | None, typer.Option("--review-into", metavar="FOLDER", rich_help_panel=CHECKS, help=(
    "With --labels: copy each suspect into FOLDER/<given>-><suggested>/ for a person to look at (copies: the "
    "dataset is never changed), listed in FOLDER/review.csv."))]

# Inference commands.
Models = Annotated[list[str] | None, typer.Option("--model", "-m", metavar="PATH", help=(
    "Model file (best.pt, or an export: .pt, .safetensors, .pt2, .onnx, .xml); repeat for an ensemble. Default: the "
    "latest run's best model (runs/latest.json)."))]
Tta = Annotated[bool, typer.Option("--tta", help=(
    "Test-time augmentation: average the logits of each image and its mirror image (two forward passes)."))]
InferBatch = Annotated[int, typer.Option("--batch-size", "-b", metavar="N", help="Images per forward pass.")]
InferWorkers = Annotated[int, typer.Option("--workers", "-j", metavar="N", help="Decoding threads.")]
InferDevice = Annotated[str, typer.Option(metavar="DEVICE", help=f"{one_of(DEVICES)}.")]
InferMaxPixels = Annotated[int, typer.Option(metavar="N", help=(
    "Refuse images with more pixels than this (decompression bombs), read from the header."))]
AsJson = Annotated[bool, typer.Option("--json", help="The full result as JSON on stdout.")]
Explain = Annotated[str | None, typer.Option("--explain", metavar="FOLDER", help=(
    "Also write FOLDER/<image>.png per image: the photo under a Grad-CAM heatmap of what drove the top class, "
    "beside the top-k bars. One model (no ensemble, no .onnx/.pt2). Needs finetune[explain]."))]
InferQuiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no model line on stderr.")]
Threshold = Annotated[list[str] | None, typer.Option("--threshold", metavar="P|CLASS=P", help=(
    "Multi-label models: predict a label when its probability is at least P (all classes), or CLASS=P for one "
    "class; repeatable. Default: the per-class thresholds fitted on the val images, stored in the model."))]
Runtime = Annotated[str, typer.Option(metavar="NAME", help=(
    f"{one_of(RUNTIMES)}: what runs the model on the CPU. auto = the fastest installed for the file: OpenVINO for "
    ".xml and .onnx (else onnxruntime for .onnx), torch for .pt/.pt2/.safetensors files (openvino converts those "
    "at every start, 10-20 s)."))]
Int8 = Annotated[bool, typer.Option("--int8", help=(
    "int8 post-training quantization for fast CPU inference (.onnx: onnxruntime, .xml: OpenVINO NNCF), calibrated "
    "on training images; kept only if its val accuracy is within --max-accuracy-drop of fp32's."))]
CalibrationImages = Annotated[str | None, typer.Option(metavar="IMAGES", help=(
    "With --int8: images to calibrate on. Default: the run's training images (split.json)."))]
CalibrationCount = Annotated[int, typer.Option(metavar="N", help="With --int8: how many images to calibrate on.")]
MaxAccuracyDrop = Annotated[float, typer.Option(metavar="POINTS", help=(
    "With --int8: refuse the file when its val accuracy is more than this many points below fp32's."))]
Force = Annotated[bool, typer.Option("--force", help=(
    "With --int8: keep the file even when the accuracy check fails or cannot run (no labelled images)."))]


# Each TrainConfig setting's option, in the order help lists them (within its panel).
SETTINGS = {
    "val_fraction": ValFraction, "seed": Seed, "strict": Strict, "max_pixels": MaxPixels, "folds": Folds,
    "fold": Fold, "path_col": PathCol, "label_col": LabelCol, "label_sep": LabelSep, "multi_label": MultiLabel,
    "image_dir": ImageDir, "model": Model, "weights": Weights, "mode": Mode, "solver": Solver, "dropout": Dropout,
    "freeze_epochs": FreezeEpochs, "backbone_lr_mult": BackboneLrMult, "epochs": Epochs, "time_budget": TimeBudget,
    "batch_size": BatchSize, "lr": Lr, "optimizer": Optimizer, "momentum": Momentum, "weight_decay": WeightDecay,
    "scheduler": Scheduler, "augment": Augment, "train_size": TrainSize, "mixup": Mixup, "cutmix": Cutmix,
    "label_smoothing": LabelSmoothing, "erasing": Erasing, "init_from": InitFrom, "balance": Balance,
    "patience": Patience, "calibrate": Calibrate, "overfit": Overfit, "deterministic": Deterministic,
    "device": Device, "workers": Workers, "amp": Amp, "channels_last": ChannelsLast, "compile": Compile,
    "sync_bn": SyncBn, "output": Output, "overwrite": Overwrite, "log": Log,
}
# Where an option's default differs in form from the setting's: a duration is typed as text (10m).
OPTION_DEFAULTS = {"time_budget": None}


def settings(*names: str):
    """The command also takes these TrainConfig settings as options (from SETTINGS, defaults from TrainConfig); they
    reach it in its **settings. In help its arguments come first, then the settings, then its own options."""
    def wrap(func):
        sig = inspect.signature(func, eval_str=True)  # real types: typer reads its options from them
        own = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        first = [p for p in own if p.annotation is typer.Context or _is_argument(p.annotation)]
        added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=OPTION_DEFAULTS.get(n, D[n]),
                                   annotation=SETTINGS[n]) for n in names]
        rest = [inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, default=p.default, annotation=p.annotation)
                for p in own if p not in first]

        @functools.wraps(func)
        def command(*args, **kwargs):
            return func(*args, **kwargs)

        command.__signature__ = sig.replace(parameters=[*first, *added, *rest])
        command.__annotations__ = {**func.__annotations__, **{n: SETTINGS[n] for n in names}}
        return command

    return wrap


def _is_argument(annotation) -> bool:
    extras = typing.get_args(annotation)[1:] if typing.get_origin(annotation) is Annotated else ()
    return any(isinstance(m, typer.models.ArgumentInfo) for m in extras)
