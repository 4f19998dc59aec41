"""Pure privacy formulas: neighbouring relation, sensitivities, calibration (autodp), noise."""
