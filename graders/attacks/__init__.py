"""The defense-phase attack suite: white-box (PGD, APGD, FAB) and black-box (Square) attacks on
[0, 1] images, run in sequence on still-robust points, with exact feasibility checks."""
