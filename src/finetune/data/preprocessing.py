"""How a model wants its input: resize, crop, mean/std and interpolation, and the transforms built from them.

Taken from the torchvision weights' own transforms() when a model is built, and stored in the model file
(as the plain dict to_dict() gives), so predict, evaluate and export always preprocess as training did.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.config import AUGMENTATIONS


@dataclass(frozen=True)
class Preprocessing:
    resize_size: int  # shorter side before the center crop
    crop_size: int  # the square the model sees at evaluation
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str  # torchvision InterpolationMode value, e.g. "bilinear"

    @classmethod
    def from_weights(cls, weights) -> Preprocessing:
        """From a torchvision weights enum member's own transforms()."""
        t = weights.transforms()
        return cls(int(t.resize_size[0]), int(t.crop_size[0]), tuple(float(x) for x in t.mean),
                   tuple(float(x) for x in t.std), t.interpolation.value)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """From the plain dict stored in model files (any finetune version)."""
        return cls(int(d["resize_size"]), int(d["crop_size"]), tuple(float(x) for x in d["mean"]),
                   tuple(float(x) for x in d["std"]), str(d["interpolation"]))

    def to_dict(self) -> dict:
        """Plain types for model files and JSON."""
        return {"resize_size": self.resize_size, "crop_size": self.crop_size, "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation}

    def eval_transform(self):
        """Resize + center crop + normalise, exactly as the weights were evaluated."""
        import torch
        from torchvision.transforms import InterpolationMode, v2

        return v2.Compose([
            v2.ToImage(),
            v2.Resize(self.resize_size, interpolation=InterpolationMode(self.interpolation), antialias=True),
            v2.CenterCrop(self.crop_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(self.mean), list(self.std)),
        ])

    def train_transform(self, augment: str, size: int | None = None, erasing: float = 0.0):
        """Training view: random resized crop (to size, default the eval crop) and flips, then per augment small
        rotations or a policy of torchvision's (TrivialAugmentWide, RandAugment), then the eval normalisation and,
        with probability erasing, a random rectangle erased (torchvision's RandomErasing)."""
        import torch
        from torchvision.transforms import InterpolationMode, v2

        if augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {augment!r}; choose from {AUGMENTATIONS}")
        erase = [v2.RandomErasing(p=erasing, value=0)] if erasing > 0 else []  # 0 after Normalize: the mean colour
        if augment == "none":
            return v2.Compose([self.eval_transform(), *erase])
        interp = InterpolationMode(self.interpolation)
        crop = size or self.crop_size
        scale = (0.35, 1.0) if augment == "light" else (0.08, 1.0)
        geometric = [v2.RandomResizedCrop(crop, scale=scale, interpolation=interp, antialias=True),
                     v2.RandomHorizontalFlip()]
        # Rotations and affine warps of tensors take nearest or bilinear only (timm models often ask bicubic).
        warp = interp if interp in (InterpolationMode.NEAREST, InterpolationMode.BILINEAR) else InterpolationMode.BILINEAR
        policy = {"standard": lambda: v2.RandomRotation(10, interpolation=warp),
                  "trivial": lambda: v2.TrivialAugmentWide(interpolation=warp),
                  "randaugment": lambda: v2.RandAugment(num_ops=2, magnitude=9, interpolation=warp)}
        if augment in policy:  # the policies work on uint8 images, before the conversion to float
            geometric.append(policy[augment]())
        return v2.Compose([v2.ToImage(), *geometric, v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize(list(self.mean), list(self.std)), *erase])
