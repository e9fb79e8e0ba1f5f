"""A stage's state: weights, optimizer, learning-rate scales, one flat serialisation, checkpoints and the CheckFree/CheckFree+ tensor rules."""
