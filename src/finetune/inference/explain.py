"""What drove a prediction: a Grad-CAM heatmap of one class over the photo (captum's LayerGradCam), and the
picture `predict --explain` writes (the photo under its heatmap, beside the top-k bars).

Grad-CAM (Selvaraju et al. 2017) weighs the activation maps of one late layer by the mean gradient of the class
score. The layer is chosen per architecture family from a table; transformers get the same treatment on their
token grid: ViT on the tokens entering its last block's attention (the last block's own output reaches the
class token only through the class token itself, so its patch tokens get no gradient), Swin on its last stage.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from finetune._util.devices import resolve_device
from finetune.config import MAX_PIXELS
from finetune.data.images import load_image
from finetune.errors import UsageError
from finetune.models.model_file import load_model_file, network_from
from finetune.viz import pictures

INSTALL = "pip install 'finetune[explain]'"
SHOWN_SIDE = 512  # the photo's longer side in the picture: enough to see the heatmap, small PNGs

# Architecture family (torchvision name prefix) -> the layer Grad-CAM reads, and the layout of its output:
# nchw (a CNN's maps), nhwc (Swin's stages) or tokens (ViT: a class token, then a square grid of patches).
TARGETS = {
    "resnet": (lambda m: m.layer4, "nchw"), "wide_resnet": (lambda m: m.layer4, "nchw"),
    "resnext": (lambda m: m.layer4, "nchw"), "regnet": (lambda m: m.trunk_output, "nchw"),
    "mobilenet": (lambda m: m.features, "nchw"), "efficientnet": (lambda m: m.features, "nchw"),
    "mnasnet": (lambda m: m.layers, "nchw"), "densenet": (lambda m: m.features, "nchw"),
    "vgg": (lambda m: m.features, "nchw"), "alexnet": (lambda m: m.features, "nchw"),
    "convnext": (lambda m: m.features, "nchw"), "squeezenet": (lambda m: m.features, "nchw"),
    "shufflenet": (lambda m: m.conv5, "nchw"), "googlenet": (lambda m: m.inception5b, "nchw"),
    "inception": (lambda m: m.Mixed_7c, "nchw"), "maxvit": (lambda m: m.blocks[-1], "nchw"),
    "swin": (lambda m: m.features, "nhwc"), "vit": (lambda m: m.encoder.layers[-1].ln_1, "tokens"),
}


def family(arch: str) -> str:
    """The TARGETS entry of an architecture (its longest matching name prefix), or exit 2 naming the known ones."""
    found = max((f for f in TARGETS if arch.startswith(f)), key=len, default=None)
    if found is None:
        raise UsageError(f"--explain: no Grad-CAM layer known for architecture {arch!r}; explanations cover the "
                         f"torchvision families {', '.join(sorted(TARGETS))}")
    return found


def require_captum() -> None:
    try:
        import captum.attr  # noqa: F401
    except ImportError:
        raise UsageError(f"--explain draws Grad-CAM heatmaps with captum, which is not installed: {INSTALL}") from None


@dataclass
class Explanation:
    path: str
    photo: object  # PIL RGB image, full size, EXIF-rotated: what the heatmap lies over
    heatmap: object  # float32 numpy [height, width] in [0, 1], the photo's size (0 outside the model's crop)
    target: int  # the class explained


class Explainer:
    """A model file loaded for gradients (never under inference_mode) with its Grad-CAM layer."""

    def __init__(self, model_path: str | os.PathLike, device: str = "auto", max_pixels: int = MAX_PIXELS):
        p = Path(model_path)
        if p.suffix.lower() in (".onnx", ".pt2"):
            raise UsageError(f"--explain: {p} is a compiled {p.suffix} export, which gives no gradients; explain "
                             "with the model file it came from (best.pt, or a .pt/.safetensors export)")
        require_captum()
        mf = load_model_file(p)
        if mf.members:
            raise UsageError(f"--explain: {p} is an ensemble, whose members look at different things; explain one "
                             "member's model file at a time")
        self.info, self.max_pixels = mf, max_pixels
        self.getter, self.layout = TARGETS[family(mf.arch)]
        self.device = resolve_device(device)
        self.module = network_from(mf, mf.arch, mf.state_dict, mf.dropout).module.to(self.device).eval()
        for p in self.module.parameters():  # Grad-CAM needs gradients of one layer's output only: half the time
            p.requires_grad_(False)
        self.transform = mf.preprocessing.eval_transform()

    def explain(self, path: str, target: int) -> Explanation:
        """The heatmap of class index target over the photo at path."""
        from torchvision.transforms.v2 import functional as F

        pre = self.info.preprocessing
        photo = load_image(path, max_pixels=self.max_pixels)
        x = self.transform(F.pil_to_tensor(F.resize(photo, pre.resize_size, antialias=True)))
        heat = self.grad_cam(x[None].contiguous().to(self.device), target)[0]
        return Explanation(path, photo, place(heat, photo.size, pre.resize_size), target)

    def grad_cam(self, batch, target: int):
        """[batch, crop, crop] Grad-CAM maps in [0, 1] (each divided by its maximum)."""
        import torch
        from captum.attr import LayerAttribution, LayerGradCam

        layer, handle = _grid_layer(self.getter(self.module), self.layout)
        try:
            with torch.enable_grad():
                cam = LayerGradCam(self.module, layer).attribute(batch, target=target, relu_attributions=True)
        finally:
            if handle is not None:
                handle.remove()
        cam = LayerAttribution.interpolate(cam.detach().float(), tuple(batch.shape[-2:]), "bilinear")[:, 0]
        cam = cam.clamp_min(0)
        top = cam.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]
        return (cam / top).clamp(0, 1).cpu()


def _grid_layer(layer, layout: str):
    """(a module whose output is [batch, channels, h, w], a hook handle to remove): the layer itself for CNNs;
    for token and channels-last layouts an identity module its output passes through, reshaped to a grid."""
    import torch

    if layout == "nchw":
        return layer, None
    grid = torch.nn.Identity()

    def hook(module, inputs, out):
        if layout == "nhwc":
            return grid(out.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        b, n, d = out.shape
        side = math.isqrt(n - 1)
        patches = grid(out[:, 1:].reshape(b, side, side, d).permute(0, 3, 1, 2))
        return torch.cat([out[:, :1], patches.permute(0, 2, 3, 1).reshape(b, n - 1, d)], 1)

    return grid, layer.register_forward_hook(hook)


def place(heat, size: tuple[int, int], resize_size: int):
    """A [crop, crop] map of the center crop, laid onto a photo of size (width, height): the photo was resized to
    resize_size on its shorter side and center-cropped, so the crop covers a centered square of the photo."""
    import numpy as np
    from PIL import Image

    width, height = size
    crop = heat.shape[-1]
    side = crop * min(width, height) / resize_size  # the crop's side in photo pixels
    left, top = round((width - side) / 2), round((height - side) / 2)
    span = max(1, round(side))
    square = np.asarray(Image.fromarray(heat.numpy().astype(np.float32), "F").resize((span, span),
                                                                                     Image.BILINEAR))
    out = np.zeros((height, width), dtype=np.float32)
    x0, y0 = max(0, left), max(0, top)
    x1, y1 = min(width, left + span), min(height, top + span)
    out[y0:y1, x0:x1] = square[y0 - top:y1 - top, x0 - left:x1 - left]
    return np.clip(out, 0.0, 1.0)


def draw(path: Path, e: Explanation, top: list[tuple[str, float]]) -> Path:
    """The photo under its heatmap, and the top-k classes as bars (the explained one highlighted)."""
    fig, axes = pictures.subplots(1, 2, figsize=(10, 4.2))
    photo_ax, bars = axes[0]
    photo_ax.imshow(pictures.blend(e.photo, e.heatmap, SHOWN_SIDE))
    photo_ax.axis("off")
    photo_ax.set_title(pictures.plain(f"{Path(e.path).name[:48]}\nwhat drove: {top[0][0]} ({top[0][1]:.1%})"),
                       fontsize=9)
    names = [pictures.plain(c) for c, _ in top]
    bars.barh(range(len(top)), [p for _, p in top], color=["tab:red"] + ["tab:blue"] * (len(top) - 1))
    bars.set_yticks(range(len(top)), names, fontsize=9)
    bars.invert_yaxis()
    bars.set(xlim=(0, 1), xlabel="probability", title=f"top {len(top)}")
    for i, (_, p) in enumerate(top):
        bars.text(min(p + 0.02, 0.85), i, f"{p:.1%}", va="center", fontsize=8)
    return pictures.save(fig, path)


def explain_into(explainer: Explainer, predictions, out_dir: str | os.PathLike,
                 on_progress=lambda n: None) -> list[Path]:
    """One picture per prediction, OUT_DIR/<photo name>.png (numbered when two photos share a name), explaining
    each prediction's top class."""
    out_dir = Path(out_dir)
    classes = explainer.info.classes
    written, used = [], set()
    for p in predictions:
        e = explainer.explain(p.path, classes.index(p.top[0][0]))
        name, n = Path(p.path).stem, 2
        while name in used:
            name, n = f"{Path(p.path).stem}-{n}", n + 1
        used.add(name)
        written.append(draw(out_dir / f"{name}.png", e, p.top))
        on_progress(1)
    return written


def heatmaps_for(model_path: str | os.PathLike, items: list[dict]) -> dict:
    """{path: Grad-CAM map of the item's predicted class} for the report's tiles; empty without finetune[explain]
    (the tiles are then plain). A photo that cannot be explained now keeps its plain tile."""
    try:
        explainer = Explainer(model_path, "cpu")
    except UsageError:
        return {}
    out = {}
    for item in items:
        try:
            out[item["path"]] = explainer.explain(item["path"], explainer.info.classes.index(item["predicted"])).heatmap
        except Exception:  # noqa: BLE001 - moved, changed or unreadable since training: a plain tile
            continue
    return out
