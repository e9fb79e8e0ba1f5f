"""The pipeline executor (one loop for every schedule) and the stage runner it drives."""
