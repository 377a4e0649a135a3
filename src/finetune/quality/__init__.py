"""finetune check: the dataset doctor, likely label errors, near-duplicates and outliers."""
