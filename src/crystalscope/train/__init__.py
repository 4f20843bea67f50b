"""Training: callbacks, the data module, and the run that ties data, model and Lightning
together."""
