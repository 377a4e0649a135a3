"""Started by test_distributed.py under torchrun (2 CPU processes, gloo): what each rank trains and evaluates on.

Writes OUT/rank<N>.json with the training batches of epochs 1 and 2 (as image paths) and the val images.
"""

import json
import sys
from pathlib import Path

from finetune import distributed as dist
from finetune.config import TrainConfig
from finetune.train import prepare

data, out = sys.argv[1], Path(sys.argv[2])
p = prepare(TrainConfig(data=data, weights="none", epochs=2, batch_size=4, workers=0, device="cpu"))
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
