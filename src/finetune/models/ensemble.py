"""Ensembles: several models of the same classes whose probabilities are averaged, each model with its own
temperature. The one formula, for predict, evaluate and export alike:

    log( mean_i softmax(logits_i / T_i) )    (softmax of it gives the averaged probabilities; its own T is 1)
"""

from __future__ import annotations

from finetune.errors import UsageError
from finetune.models.model_file import ModelFile, network_from

ENSEMBLE_OUTPUT = ("log of the mean of the members' softmax(logits / temperature): softmax of it gives the "
                   "ensemble's probabilities (its own temperature is 1)")


def check_ensemble(files: list[ModelFile], same_preprocessing: bool = False) -> None:
    """Models can form an ensemble: the same classes in the same order (and, for one exported file that takes
    one input, the same preprocessing). Exit 2 naming the first file that differs."""
    first = files[0]
    multi = next((mf for mf in files if mf.multi_label), None)
    if multi is not None:
        raise UsageError(f"{multi.source}: a multi-label model; ensembles of multi-label models are not supported "
                         "yet (their per-label thresholds would need fitting anew); use one model")
    for mf in files[1:]:
        if mf.classes != first.classes:
            raise UsageError(f"{mf.source}: its classes {mf.classes} are not those of {first.source} {first.classes}; "
                             "an ensemble needs models of the same classes, in the same order")
        if same_preprocessing and mf.preprocessing != first.preprocessing:
            raise UsageError(f"{mf.source}: its preprocessing {mf.preprocessing.to_dict()} differs from "
                             f"{first.source}'s {first.preprocessing.to_dict()}; one exported file takes one input, "
                             "so export models with the same preprocessing (or predict with several -m instead)")


def mean_probabilities(member_logits, temperatures):
    """members x images x classes logits -> images x classes averaged probabilities."""
    import torch

    t = torch.as_tensor(temperatures, dtype=torch.float32, device=member_logits[0].device).view(-1, 1, 1)
    return torch.softmax(torch.stack(list(member_logits)).float() / t, dim=2).mean(0)


def log_mean_probabilities(member_logits, temperatures):
    """The ensemble's output: log of the averaged probabilities (see the module docstring)."""
    return mean_probabilities(member_logits, temperatures).clamp_min(1e-12).log()


def ensemble_module(modules: list, temperatures: list[float]):
    """One torch module for several models taking the same input; traceable, so .pt2 and .onnx hold it whole."""
    import torch

    class Ensemble(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.members = torch.nn.ModuleList(modules)
            self.register_buffer("temperatures", torch.tensor(temperatures, dtype=torch.float32))

        def forward(self, x):
            return log_mean_probabilities([m(x) for m in self.members], self.temperatures)

    return Ensemble().eval()


def combine(files: list[ModelFile], networks: list) -> tuple[object, ModelFile]:
    """(ensemble module, its ModelFile) from model files of the same classes and preprocessing."""
    check_ensemble(files, same_preprocessing=True)
    temperatures = [mf.temperature for mf in files]
    module = ensemble_module([n.module for n in networks], temperatures)
    state = {f"members.{i}.{k}": v for i, mf in enumerate(files) for k, v in mf.state_dict.items()}
    members = [{"arch": mf.arch, "base_weights": mf.base_weights, "temperature": t, "metrics": mf.metrics,
                "source": mf.source.rsplit("/", 1)[-1]} for mf, t in zip(files, temperatures)]
    first = files[0]
    return module, ModelFile(arch="ensemble", classes=first.classes, preprocessing=first.preprocessing,
                             state_dict=state, config=first.config, members=members, source=first.source)


def module_from_file(mf: ModelFile):
    """The torch module of an exported ensemble file (members.i.* keys, members described in its metadata)."""
    modules = []
    for i, member in enumerate(mf.members):
        prefix = f"members.{i}."
        state = {k[len(prefix):]: v for k, v in mf.state_dict.items() if k.startswith(prefix)}
        modules.append(network_from(mf, member["arch"], state, 0.0).module)
    return ensemble_module(modules, [float(m.get("temperature", 1.0)) for m in mf.members])
