"""Started by test_distributed.py under torchrun (2 CPU processes, gloo).

    dist_worker.py shares DATA OUT    OUT/rank<N>.json: each rank's training batches (epochs 1, 2) and val images
    dist_worker.py failing DATA OUT   train 3 epochs, streaming; rank 0 breaks one of rank 1's images after
                                      epoch 1; OUT/rank0.json: the files rank 0 reported as skipped
    dist_worker.py freeze DATA OUT    2 epochs with --freeze-epochs 1; OUT/rank0.json: every rank's parameter
                                      checksums after each epoch
"""

import json
import sys
from pathlib import Path

from finetune._util import ddp as dist
from finetune.config import TrainConfig
from finetune.training import run_training
from finetune.training.setup import prepare

mode, data, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
if mode == "shares":
    p = prepare(TrainConfig(data=data, mode="finetune", weights="none", epochs=2, batch_size=4, workers=0, device="cpu"))
    loader = p.epochs.train_loader
    batches = {}
    for epoch in (1, 2):
        loader.batch_sampler.set_epoch(epoch)
        batches[epoch] = [[loader.dataset.samples[i].path for i in batch] for batch in loader.batch_sampler]
    rank = dist.current().rank
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world": dist.current().size, "steps": p.epochs.batches, "batches": batches,
        "val": [s.path for s in p.epochs.val_loader.dataset.samples], "split_train": [s.path for s in p.split.train],
    }))
elif mode == "failing":
    victim = Path(sys.argv[4])
    reported = []

    def emit(event, **kw):  # called on rank 0 only
        if event == "epoch_end" and kw["row"]["epoch"] == 1:
            victim.write_bytes(b"garbage")
        if event == "skipped":
            reported.extend(kw["files"])

    cfg = TrainConfig(data=data, mode="finetune", weights="none", epochs=3, batch_size=4, workers=0, device="cpu", augment="none",
                      output=str(out / "run"))
    result = run_training(cfg, emit)
    if dist.current().main:
        (out / "rank0.json").write_text(json.dumps({"reported": reported, "epochs": len(result.history)}))
elif mode == "freeze":
    p = prepare(TrainConfig(data=data, mode="finetune", weights="none", epochs=2, batch_size=4, workers=0, device="cpu",
                            freeze_epochs=1))
    sums = []
    for epoch in (1, 2):
        p.epochs(epoch)
        sums.append({n: float(t.double().sum()) for n, t in p.net.module.named_parameters()})
    every = dist.all_gather(sums)
    if dist.current().main:
        (out / "rank0.json").write_text(json.dumps({"ranks": every, "head": p.net.head}))
