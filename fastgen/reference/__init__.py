"""Plain-torch references of every op: the ground truth every backend is tested against."""
