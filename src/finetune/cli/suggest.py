"""`finetune suggest`: the photos of an unlabelled pool to label next, most useful first, with the model's guess and
why each was chosen; --into copies them as FOLDER/<guess>/<photo> or lists them in a label file to correct."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.table import Column, Table

from finetune._util.files import dumps_json, latest_model
from finetune.cli import options as o
from finetune.cli.app import command
from finetune.cli.infer import name_model
from finetune.cli.render import LazyProgress, err, esc, out, warn
from finetune.config import MAX_PIXELS
from finetune.errors import DatasetError, FinetuneError, NothingToDoError
from finetune.quality.near_duplicates import NEAR_DUPLICATE
from finetune.quality.suggest import Suggestions, suggest

DEFAULT_COUNT = 30


@command("suggest", epilog="Example: finetune suggest ./unlabelled -m runs/20261123-101500-mobilenet_v2/best.pt -n 30 "
                "--into ./images")
def suggest_command(
    pool: Annotated[list[str], typer.Argument(metavar="POOL", show_default=False, help=(
        "The unlabelled photos: folders (searched recursively, flat or nested), files, globs, or a label file (its "
        "images; its labels are not used)."))],
    model: Annotated[str | None, typer.Option("--model", "-m", metavar="PATH", help=(
        "Model file: the run's best.pt, or its .pt / .safetensors export (suggest reads the features its head "
        "sees, which .onnx, .pt2 and .xml files hide). Default: the latest run's best model (runs/latest.json)."))
                     ] = None,
    count: Annotated[int, typer.Option("--count", "-n", metavar="N", help="How many photos to suggest.")
                     ] = DEFAULT_COUNT,
    into: Annotated[str | None, typer.Option("--into", metavar="DEST", help=(
        "Also copy the photos as DEST/<guess>/<photo> (labelling is moving the wrong ones to their class folder; "
        "logged in DEST/suggested.csv), or, for a DEST ending in .csv, add them to that label file as path,guess "
        "rows to correct (multi-label models: a label file only). Ready for `finetune train`; a later round adds to "
        "it and never suggests what is already there."))] = None,
    labelled: Annotated[list[str] | None, typer.Option("--labelled", metavar="PATH", help=(
        "Photos already labelled (folders, files, globs, a label file); repeatable. They and their byte-identical "
        "or near-duplicate copies are never suggested. Default: the images the model was trained and validated on "
        "(split.json beside the model file)."))] = None,
    as_json: Annotated[bool, typer.Option("--json", help=(
        "The full result as JSON on stdout (every photo's guess, margin, entropy and reason; what was left out)."))
                       ] = False,
    seed: Annotated[int, typer.Option(metavar="N", help=(
        "Seed of the ranking's draws (k-means++ seeding): the same seed and photos give the same list."))] = 0,
    similarity: Annotated[float, typer.Option(metavar="COS", help=(
        "Cosine similarity of the model's features at which two photos are near-duplicates: never both suggested, "
        "nor one of a labelled photo (measured for MobileNetV2 like check --labels'; see docs/data.md)."))
                          ] = NEAR_DUPLICATE,
    batch_size: o.InferBatch = 32, device: o.InferDevice = "auto", workers: o.InferWorkers = 2,
    max_pixels: o.InferMaxPixels = MAX_PIXELS, quiet: o.InferQuiet = False,
) -> None:
    """Which photos to label next: rank an unlabelled pool by what each would teach the model (how unsure it is
    of a photo, and how unlike the others it is), most useful first, with the model's guess and why."""
    chosen = model or str(latest_model())
    with LazyProgress("features", quiet) as bar:
        result = suggest(chosen, pool, count, labelled, into, seed, device, batch_size, workers, max_pixels,
                         similarity, bar.start, bar.advance)
    name_model([chosen], result.model_description, bool(model), quiet)
    for f in result.skipped:
        warn(f"skipped {esc(f['path'])}: {esc(f['reason'])}")
    if as_json:
        sys.stdout.write(dumps_json(result.to_dict()) + "\n")
    else:
        _table(result)
    _summary(result, quiet)
    if not result.suggestions:
        raise _nothing_suggested(result)


def _nothing_suggested(r: Suggestions) -> FinetuneError:
    """No photo can be read: the inputs are at fault (as predict's); else every one is labelled, waiting or a
    near-duplicate of a labelled one: nothing left to do."""
    if not (r.already_labelled or r.pending or r.near_labelled):
        return DatasetError("none of the pool's photos could be read (each is named above, with why); nothing to "
                            "suggest")
    return NothingToDoError("nothing to suggest: every photo of the pool is labelled, waiting in --into, unreadable, "
                            "or a near-duplicate of a labelled photo")


def _table(r: Suggestions) -> None:
    if not r.suggestions:
        return
    t = Table("#", Column("photo", overflow="fold"), "guess", "p", Column("why", overflow="fold"),
              title=f"label these {len(r.suggestions)} next, most useful first", title_justify="left")
    for s in r.suggestions:
        guess = ", ".join(s.guess) if s.guess else "(no label)"
        t.add_row(str(s.rank), esc(s.path), esc(guess), f"{s.probability:.2f}", esc(s.reason))
    out.print(t)


def _summary(r: Suggestions, quiet: bool) -> None:
    """On stderr: what was ranked, what was left out and why, where the photos went and what to do next."""
    left = [(len(r.already_labelled), "labelled already"),
            (len(r.pending), "waiting in --into from an earlier round"),
            (len(r.near_labelled), "near-duplicates of labelled photos")]
    out_words = ", ".join(f"{n} {why}" for n, why in left if n) or "none"
    if not quiet:
        t = r.timings
        err.print(f"ranked {r.ranked} of the pool's {r.pool} photos in {r.seconds:.1f} s (loading the model "
                  f"{t['model']:.1f} s, features {t['features']:.1f} s with {r.features_cached} from the cache, "
                  f"ranking {t['ranking']:.1f} s); labelled photos known: {r.labelled}, {esc(r.labelled_source)}; "
                  f"left out: {out_words}", highlight=False)
    if len(r.near_labelled) > r.ranked / 2:
        warn(f"{len(r.near_labelled)} of {r.ranked} photos are near-duplicates of labelled photos by this model's "
             f"features (cosine >= --similarity): features that tell photos apart this little (random or untrained "
             "weights?) cannot rank them; train from pretrained weights, or raise --similarity")
    if not r.suggestions:
        return
    if len(r.suggestions) < r.requested:
        warn(f"{len(r.suggestions)} photo(s) suggested of the {r.requested} asked: the rest of the pool is labelled "
             "already or a near-duplicate of a photo suggested")
    if r.into is None:
        return
    if r.into["form"] == "folders":
        folders = ", ".join(f"{esc(k)} {v}" for k, v in r.into["folders"].items())
        err.print(f"copied into {esc(r.into['path'])}/ ({folders}; {r.into['copied']} copied now); log: "
                  f"{esc(r.into['log'])}. The folders are the model's guesses: move each wrong photo to its class "
                  "folder before training on them", highlight=False)
    else:
        err.print(f"listed in {esc(r.into['path'])} ({r.into['added']} row(s) added, {r.into['rows']} in all): "
                  "correct the guess column, then train on it (`finetune train` reads path,guess"
                  + (", with --multi-label" if r.multi_label else "") + ")", highlight=False)
