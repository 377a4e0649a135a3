"""Drawing only: curves, confusion matrices, image grids, filters (matplotlib, never shown)."""
