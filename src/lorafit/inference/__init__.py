"""Using a trained classifier: probabilities, predictions and evaluation of saved runs."""
