"""Trainable modules: PFA projections and ITC loss, CMAF fusion and the classifier."""
