"""Training-set builders: simulated data made into the arrays the trainers in deepfield.models take."""
