"""Plumbing: atomic writes and caches, optional extras, devices, torch.distributed."""
