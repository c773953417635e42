"""The evaluator versions stored with every score; bump one whenever scoring can change a number."""

EVALUATOR_VERSION = "attack-1.0.0"
DEFENSE_EVALUATOR_VERSION = "defense-1.0.0"
