"""Reading the data users already have, and the model."""
