"""sbatch templates and the submit helper (``python -m vitssl.slurm.submit``)."""
