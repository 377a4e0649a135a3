"""Build, load and save networks: the torchvision and timm registries, pretrained weights, the model file, ensembles."""
