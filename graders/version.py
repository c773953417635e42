"""The evaluator version stored with every score; bump it whenever scoring can change a number."""

EVALUATOR_VERSION = "attack-1.0.0"
