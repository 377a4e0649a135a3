"""Disk -> samples: folders and label files, image decoding, preprocessing, stratified splits, the content index,
and the inputs a user names (files, folders, globs)."""
