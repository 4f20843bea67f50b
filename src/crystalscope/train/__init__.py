"""Training: named recipes, callbacks, and the run that ties data, model and Lightning together."""
