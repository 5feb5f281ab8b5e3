"""Evaluation of pretrained encoders: k-NN, linear probe, fine-tuning, label efficiency,
online k-NN monitoring and pictures. ``python -m vitssl.train.evaluate PROTOCOL RECIPE``
runs one."""
